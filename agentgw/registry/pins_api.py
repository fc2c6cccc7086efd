"""Admin API of pinning: review what changed in tools, prompts and resource templates, approve the new
definitions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, status
from pydantic import BaseModel, Field

from agentgw.api_contract import Guard, errors
from agentgw.call import Principal
from agentgw.registry.models import NAME_REGEX
from agentgw.registry.pins import Pin, PinKind, Pins

__all__ = ["PinOut", "pins_router"]

PathName = Annotated[str, Path(pattern=NAME_REGEX, max_length=63, description="a registry server name")]


class PinOut(BaseModel):
    """One tool, prompt or resource template of a server as pinning sees it: approved, quarantined
    (changed) or pending (new)."""

    kind: str
    name: str
    state: str
    changed: list[str]
    approved: dict[str, Any] | None
    seen: dict[str, Any]
    changed_at: float
    approved_by: str | None


Names = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=256)]], Field(default_factory=list, max_length=1000)
]


class ApproveIn(BaseModel):
    """The tools to approve as last seen; empty: every quarantined or pending tool of the server."""

    tools: Names


class ApprovePromptsIn(BaseModel):
    """The prompts to approve as last seen; empty: every quarantined or pending prompt of the server."""

    prompts: Names


class ApproveTemplatesIn(BaseModel):
    """The resource templates (by name) to approve as last seen; empty: every quarantined or pending
    template of the server."""

    templates: Names


class ApprovedOut(BaseModel):
    approved: list[str]


def _out(pin: Pin) -> PinOut:
    return PinOut(
        kind=pin.kind,
        name=pin.name,
        state=pin.state,
        changed=pin.changes() if pin.state != "approved" else [],
        approved=pin.approved,
        seen=pin.seen,
        changed_at=pin.changed_at,
        approved_by=pin.approved_by,
    )


def pins_router(pins: Pins, read_guard: Guard, write_guard: Guard) -> APIRouter:
    """Routes under /admin/registry/servers/{name}/tools, .../prompts and .../resource-templates,
    guarded by the grant on `admin:registry`."""
    router = APIRouter(prefix="/admin/registry", tags=["registry"])
    read = Depends(read_guard)
    write = Depends(write_guard)

    def approve(name: str, names: list[str], kind: PinKind, principal: Principal) -> ApprovedOut:
        try:
            approved = pins.approve(name, names, by=principal.subject, kind=kind)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc.args[0])) from exc
        return ApprovedOut(approved=approved)

    @router.get("/servers/{name}/tools", response_model=list[PinOut])
    async def list_tools(name: PathName, _: Any = read) -> list[PinOut]:
        pins.refresh()
        return [_out(p) for p in pins.pins(name, "tool")]

    @router.post("/servers/{name}/tools/approve", response_model=ApprovedOut, responses=errors(400, 404))
    async def approve_tools(name: PathName, body: ApproveIn, principal: Principal = write) -> ApprovedOut:
        return approve(name, body.tools, "tool", principal)

    @router.get("/servers/{name}/prompts", response_model=list[PinOut])
    async def list_prompts(name: PathName, _: Any = read) -> list[PinOut]:
        pins.refresh()
        return [_out(p) for p in pins.pins(name, "prompt")]

    @router.post("/servers/{name}/prompts/approve", response_model=ApprovedOut, responses=errors(400, 404))
    async def approve_prompts(
        name: PathName, body: ApprovePromptsIn, principal: Principal = write
    ) -> ApprovedOut:
        return approve(name, body.prompts, "prompt", principal)

    @router.get("/servers/{name}/resource-templates", response_model=list[PinOut])
    async def list_templates(name: PathName, _: Any = read) -> list[PinOut]:
        pins.refresh()
        return [_out(p) for p in pins.pins(name, "template")]

    @router.post(
        "/servers/{name}/resource-templates/approve", response_model=ApprovedOut, responses=errors(400, 404)
    )
    async def approve_templates(
        name: PathName, body: ApproveTemplatesIn, principal: Principal = write
    ) -> ApprovedOut:
        return approve(name, body.templates, "template", principal)

    return router
