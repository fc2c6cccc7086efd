"""Admin API of the registry (control plane, FastAPI, documented at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel

from agentgw.api_contract import Guard, errors, invalid
from agentgw.registry.admission import Admission
from agentgw.registry.models import NAME_REGEX, McpServerSpec, VirtualServerSpec
from agentgw.registry.secrets import Secrets
from agentgw.registry.store import RegistryConflict, RegistryStore

__all__ = ["ServerStatus", "registry_router"]

# A registry name in the path, checked (and documented) by FastAPI: 422 in its own shape.
PathName = Annotated[
    str,
    Path(pattern=NAME_REGEX, max_length=63, description="a registry name; in a PUT, the `name` of the body"),
]


class ServerStatus(BaseModel):
    """Whether a stored server serves, and if not why (secrets by name only, never where they live)."""

    name: str
    owner: str
    state: Literal["ok", "disabled", "failing"]
    problem: str | None = None


def registry_router(
    store: RegistryStore,
    read_guard: Guard,
    write_guard: Guard,
    *,
    exec_guard: Guard | None = None,
    admission: Admission | None = None,
) -> APIRouter:
    """Routes under /admin/registry; each guarded by the policy grant on `admin:registry`. A stdio
    server also needs `exec_guard` (the grant on `admin:exec`; without one, none is admitted), and
    every server the rules of `admission` (secrets declared for it, the stdio allow-list)."""
    router = APIRouter(prefix="/admin/registry", tags=["registry"])
    rules = admission or Admission(Secrets({}))
    # Guards as default values, not local Annotated aliases: FastAPI cannot resolve a local alias
    # under postponed annotations (it would become a required query parameter).
    read = Depends(read_guard)
    write = Depends(write_guard)

    async def _admit(spec: McpServerSpec, request: Request) -> None:
        # Checked before anything is stored: a row the gateway cannot run is refused now, not at the
        # next start.
        if spec.transport == "stdio":
            if exec_guard is None:
                raise HTTPException(status.HTTP_403_FORBIDDEN, "stdio servers come from the config file")
            await exec_guard(request)
        problem = rules.problem(spec, from_config=False)
        if problem is not None:
            raise invalid("body", "credential" if spec.transport != "stdio" else "command", problem)

    @router.get("/status", response_model=list[ServerStatus])
    async def server_status(_: Any = read) -> list[ServerStatus]:
        out = [
            ServerStatus(name=name, owner=store.owner(name) or "api", state="failing", problem=why)
            for name, why in store.failing_servers().items()
        ]
        for spec in store.all_servers():
            owner = store.owner(spec.name) or "api"
            problem = rules.problem(spec, from_config=owner == "config") if spec.enabled else None
            state = "disabled" if not spec.enabled else "failing" if problem else "ok"
            out.append(ServerStatus(name=spec.name, owner=owner, state=state, problem=problem))
        return sorted(out, key=lambda s: s.name)

    @router.get("/servers", response_model=list[McpServerSpec])
    async def list_servers(_: Any = read) -> list[McpServerSpec]:
        return store.all_servers()

    @router.get("/servers/{name}", response_model=McpServerSpec, responses=errors(404))
    async def show_server(name: PathName, _: Any = read) -> McpServerSpec:
        for spec in store.all_servers():
            if spec.name == name:
                return spec
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no server named {name!r}")

    @router.post(
        "/servers",
        response_model=McpServerSpec,
        status_code=status.HTTP_201_CREATED,
        responses=errors(400, 409),
    )
    async def add_server(spec: McpServerSpec, request: Request, _: Any = write) -> McpServerSpec:
        await _admit(spec, request)
        try:
            store.put_server(spec)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.put("/servers/{name}", response_model=McpServerSpec, responses=errors(400, 409))
    async def replace_server(
        name: PathName, spec: McpServerSpec, request: Request, _: Any = write
    ) -> McpServerSpec:
        if name != spec.name:
            raise invalid("body", "name", "the name in the path and body differ", spec.name)
        await _admit(spec, request)
        try:
            store.put_server(spec, replace=True)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.delete("/servers/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
    async def remove_server(name: PathName, _: Any = write) -> None:
        try:
            removed = store.remove_server(name)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no server named {name!r}")

    @router.get("/virtual-servers", response_model=list[VirtualServerSpec])
    async def list_virtual(_: Any = read) -> list[VirtualServerSpec]:
        return store.virtual_servers()

    @router.post(
        "/virtual-servers",
        response_model=VirtualServerSpec,
        status_code=status.HTTP_201_CREATED,
        responses=errors(400, 409),
    )
    async def add_virtual(spec: VirtualServerSpec, _: Any = write) -> VirtualServerSpec:
        try:
            store.put_virtual(spec)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return spec

    @router.delete(
        "/virtual-servers/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409)
    )
    async def remove_virtual(name: PathName, _: Any = write) -> None:
        try:
            removed = store.remove_virtual(name)
        except RegistryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no virtual server named {name!r}")

    return router
