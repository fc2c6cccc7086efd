"""Admin API for dynamically registered OAuth clients, under /admin/clients; guarded by the
`admin:keys` read and write grants (clients are credentials, like API keys).

- `GET /admin/clients`: every registered client (revoked ones with their revocation time)
- `DELETE /admin/clients/{client_id}`: revoke a client and end every login it holds
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel

from agentgw.api_contract import Guard
from agentgw.oauth.registration import ClientInfo

__all__ = ["clients_router"]


class _Problem(BaseModel):
    detail: str


def clients_router(
    list_clients: Callable[[], list[ClientInfo]],
    revoke_client: Callable[[str], bool],
    read_guard: Guard,
    write_guard: Guard,
) -> APIRouter:
    """Routes under /admin/clients; `revoke_client` returns False for an unknown client."""
    router = APIRouter(prefix="/admin/clients", tags=["clients"])
    # Plain defaults, not Annotated aliases: under postponed annotations FastAPI cannot see a local alias.
    read = Depends(read_guard)
    write = Depends(write_guard)

    @router.get("", response_model=list[ClientInfo])
    async def list_registered(_: Any = read) -> list[ClientInfo]:
        return await anyio.to_thread.run_sync(list_clients)

    @router.delete(
        "/{client_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses={404: {"model": _Problem, "description": "no such client"}},
    )
    async def revoke_registered(client_id: str, _: Any = write) -> None:
        if not await anyio.to_thread.run_sync(revoke_client, client_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no registered client {client_id!r}")

    return router
