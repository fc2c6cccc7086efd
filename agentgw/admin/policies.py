"""Admin API of the policy: /admin/policies, guarded by `admin:policies` (read, write)."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field

from agentgw.api_contract import Guard, errors
from agentgw.filters.authorize import CasbinAuthorizer, PolicyError

__all__ = ["policy_router"]


class RuleIn(BaseModel):
    rule: str = Field(description="a policy line: `p, sub, obj, act[, allow|deny]` or `g, member, role`")


class RuleOut(BaseModel):
    rule: str
    source: str


class PolicyOut(BaseModel):
    rules: list[RuleOut]
    database: bool = Field(description="whether rules can be edited through this API")
    last_error: str | None = Field(description="why the last reload was refused, if it was")


class CheckIn(BaseModel):
    subject: str
    object: str
    action: str
    roles: list[str] = Field(default_factory=list)
    actors: list[str] = Field(default_factory=list)


class CheckOut(BaseModel):
    allowed: bool
    rule: str | None


def policy_router(authorizer: CasbinAuthorizer, read_guard: Guard, write_guard: Guard) -> APIRouter:
    """Routes under /admin/policies; reads need `read` on `admin:policies`, edits `write`."""
    router = APIRouter(prefix="/admin/policies", tags=["policies"])
    # Plain defaults, not Annotated aliases: under postponed annotations FastAPI cannot see a local alias.
    read = Depends(read_guard)
    write = Depends(write_guard)

    @router.get("", response_model=PolicyOut)
    async def show_policy(_: Any = read) -> PolicyOut:
        rules = [RuleOut(rule=r.text, source=r.source) for r in authorizer.rules]
        return PolicyOut(rules=rules, database=authorizer.database_enabled, last_error=authorizer.last_error)

    @router.post(
        "/rules", response_model=RuleOut, status_code=status.HTTP_201_CREATED, responses=errors(400, 409)
    )
    async def add_rule(body: RuleIn, _: Any = write) -> RuleOut:
        try:
            rule = await anyio.to_thread.run_sync(authorizer.add_rule, body.rule)
        except PolicyError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, exc.message) from exc
        return RuleOut(rule=rule.text, source=rule.source)

    @router.post("/rules/delete", status_code=status.HTTP_204_NO_CONTENT, responses=errors(400, 404, 409))
    async def remove_rule(body: RuleIn, _: Any = write) -> None:
        try:
            removed = await anyio.to_thread.run_sync(authorizer.remove_rule, body.rule)
        except PolicyError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, exc.message) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "the database holds no such rule")

    @router.post("/check", response_model=CheckOut, responses=errors(400))
    async def check(body: CheckIn, _: Any = read) -> CheckOut:
        decision = authorizer.explain(body.subject, body.roles, body.actors, body.object, body.action)
        return CheckOut(allowed=decision.allowed, rule=decision.rule)

    return router
