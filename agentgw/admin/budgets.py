"""Admin API for budgets, under /admin/budgets; guarded by `admin:budgets` read and write grants.

- `GET /admin/budgets`: every budget, with its source (config | api)
- `GET /admin/budgets/{name}`: one budget
- `PUT /admin/budgets/{name}`: add or replace an API-owned budget (config-owned: 409)
- `DELETE /admin/budgets/{name}`: remove an API-owned budget
- `GET /admin/budgets/effective?subject=&role=&client=&run=`: the budgets a principal is under,
  with what is used of each now
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel

from agentgw.api_contract import Guard, errors, invalid
from agentgw.call import Principal
from agentgw.filters.budget import BudgetStore, effective_budgets
from agentgw.records.budget import BUDGET_NAME, BudgetRule
from agentgw.storage.budget.rules import BudgetRuleBook, BudgetRuleConflict

__all__ = ["BudgetView", "budgets_router"]


class BudgetView(BaseModel):
    rule: BudgetRule
    source: str


def budgets_router(
    book: BudgetRuleBook, store: BudgetStore, read_guard: Guard, write_guard: Guard
) -> APIRouter:
    """Routes under /admin/budgets."""
    router = APIRouter(prefix="/admin/budgets", tags=["budgets"])
    # Plain defaults, not Annotated aliases: under postponed annotations FastAPI cannot see a local alias.
    read = Depends(read_guard)
    write = Depends(write_guard)

    @router.get("", response_model=list[BudgetView])
    async def list_budgets(_: Any = read) -> list[BudgetView]:
        await anyio.to_thread.run_sync(book.refresh)
        return [BudgetView(rule=r, source=s) for r, s in book.rules()]

    @router.get("/effective")
    async def effective(
        subject: str,
        role: Annotated[list[str], Query(default_factory=list)],
        _: Any = read,
        client: str | None = None,
        run: str | None = None,
    ) -> list[dict[str, object]]:
        principal = Principal(subject=subject, client_id=client, roles=tuple(role))
        return await effective_budgets(await book.current(), store, principal, run, time.time())

    @router.get("/{name}", response_model=BudgetView, responses=errors(404))
    async def show_budget(name: str, _: Any = read) -> BudgetView:
        await anyio.to_thread.run_sync(book.refresh)
        found = book.rule(name)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no budget named {name!r}")
        return BudgetView(rule=found[0], source=found[1])

    @router.put("/{name}", response_model=BudgetView, responses=errors(400, 409))
    async def put_budget(
        name: Annotated[str, Path(pattern=BUDGET_NAME, description="the same as `name` in the body")],
        rule: BudgetRule,
        _: Any = write,
    ) -> BudgetView:
        if name != rule.name:
            raise invalid("body", "name", "the name in the path and body differ", rule.name)
        try:
            await anyio.to_thread.run_sync(book.put, rule)
        except BudgetRuleConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return BudgetView(rule=rule, source="api")

    @router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
    async def remove_budget(name: str, _: Any = write) -> None:
        try:
            removed = await anyio.to_thread.run_sync(book.remove, name)
        except BudgetRuleConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        if not removed:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no budget named {name!r}")

    return router
