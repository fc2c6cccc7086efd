"""The MCP Registry read API (`GET /v0.1/servers...`), filtered by policy.

The shapes follow the official registry's OpenAPI document (`ServerList`, `ServerResponse`): each
entry is a `server.json` document (agentgw/registry/catalog.py) with the registry's lifecycle data
under `_meta["io.modelcontextprotocol.registry/official"]`.

Discovery is default deny: a caller sees a server only if the policy lets it `list` the server
(docs/decisions/0006). A server it may not see and a server that does not exist get the same 404.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse

from agentgw.api_contract import errors, single_values
from agentgw.call import Principal
from agentgw.registry.catalog import SCHEMA_URL, Catalog, CatalogEntry, rfc3339, server_json

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "may_discover", "registry_read_router"]

# The official registry's page sizes: 30 unless asked, at most 100.
DEFAULT_LIMIT = 30
MAX_LIMIT = 100
MAX_SEARCH = 200
MAX_CURSOR = 400
OFFICIAL = "io.modelcontextprotocol.registry/official"
NOT_FOUND = "Server not found"

PrincipalOf = Callable[[Request], Awaitable[Principal]]


class Decision(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def rule(self) -> str | None: ...


# The policy's answer for (principal, object, action): the same enforcer as every call's.
Decide = Callable[[Principal, str, str], Decision]


def may_discover(decide: Decide, principal: Principal, server: str) -> bool:
    """Whether `principal` may see registry server `server` (docs/decisions/0006).

    `list` on the whole server (`mcp:<server>/*`, as a rule `mcp:<server>/*` or wider grants it), or
    `list` on the server itself (`mcp:<server>`), which publishes the server to callers granted only
    some of its tools without showing them the rest. A deny that names the whole server wins.
    """
    whole = decide(principal, f"mcp:{server}/*", "list")
    if whole.allowed:
        return True
    if whole.rule is not None:  # refused by a rule, not by default: the server is hidden
        return False
    return decide(principal, f"mcp:{server}", "list").allowed


def _cursor_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _name_of_cursor(cursor: str) -> str:
    """The name a cursor continues after.

    Raises:
        HTTPException: 400, the cursor is not one this API gave out.
    """
    try:
        name = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor: pass back a nextCursor") from exc
    if not name or not name.isprintable():
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor: pass back a nextCursor")
    return name


def _since(value: datetime | None) -> float | None:
    if value is None:
        return None
    # RFC 3339 times carry an offset; one without is read as UTC rather than the host's zone.
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()


def registry_read_router(
    catalog: Catalog, principal_of: PrincipalOf, decide: Decide, *, base_url: str, namespace: str
) -> APIRouter:
    """Routes under /v0.1: the registry's servers that the caller may discover, as server.json."""
    router = APIRouter(prefix="/v0.1", tags=["MCP Registry API"], dependencies=[Depends(single_values)])
    prefix = f"{namespace}/"

    def response(entry: CatalogEntry, spec_document: dict[str, object]) -> dict[str, Any]:
        official: dict[str, Any] = {
            "status": entry.status,
            "publishedAt": rfc3339(entry.published_at),
            "updatedAt": rfc3339(entry.updated_at),
            # One version per server: the one served is the latest.
            "isLatest": True,
        }
        if entry.spec is None:
            official["statusChangedAt"] = rfc3339(entry.updated_at)
        return {"server": spec_document, "_meta": {OFFICIAL: official}}

    def document(entry: CatalogEntry) -> dict[str, object]:
        if entry.spec is not None:
            return server_json(entry.spec, base_url=base_url, namespace=namespace)
        # A deleted entry keeps only what identifies it (its spec is gone).
        return {
            "$schema": SCHEMA_URL,
            "name": f"{prefix}{entry.name}",
            "description": "Removed from this registry",
            "version": entry.version,
        }

    def visible(principal: Principal, *, deleted: bool) -> list[CatalogEntry]:
        return [
            e
            for e in catalog.entries()
            if (deleted or e.spec is not None) and may_discover(decide, principal, e.name)
        ]

    async def one(request: Request, server_name: str, include_deleted: bool) -> CatalogEntry:
        principal = await principal_of(request)
        if server_name.startswith(prefix):
            name = server_name[len(prefix) :]
            for entry in visible(principal, deleted=include_deleted):
                if entry.name == name:
                    return entry
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)

    @router.get("/servers", responses=errors(400, 401), summary="List MCP servers")
    async def list_servers(
        request: Request,
        cursor: Annotated[str | None, Query(max_length=MAX_CURSOR)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        search: Annotated[
            str | None, Query(max_length=MAX_SEARCH, description="substring of the name")
        ] = None,
        updated_since: Annotated[datetime | None, Query(description="RFC 3339 time")] = None,
        version: Annotated[str | None, Query(max_length=255, description="`latest` or a version")] = None,
        include_deleted: bool = False,
    ) -> JSONResponse:
        """The servers the caller may discover, by name; `metadata.nextCursor` continues the list."""
        principal = await principal_of(request)
        since = _since(updated_since)
        after = _name_of_cursor(cursor) if cursor is not None else None
        needle = search.lower() if search else None
        # A reader that asks what changed since a time must learn of deletions too.
        entries = visible(principal, deleted=include_deleted or since is not None)
        page: list[dict[str, Any]] = []
        next_cursor: str | None = None
        for entry in entries:
            full_name = f"{prefix}{entry.name}"
            if after is not None and full_name <= after:
                continue
            if needle is not None and needle not in full_name.lower():
                continue
            # Compared as published (RFC 3339, microseconds): a reader passes back an `updatedAt` it saw.
            if since is not None and rfc3339(entry.updated_at) <= rfc3339(since):
                continue
            if version not in (None, "latest") and entry.version != version:
                continue
            if len(page) == limit:
                next_cursor = _cursor_of(str(page[-1]["server"]["name"]))
                break
            page.append(response(entry, document(entry)))
        metadata: dict[str, Any] = {"count": len(page)}
        if next_cursor is not None:
            metadata["nextCursor"] = next_cursor
        return JSONResponse({"servers": page, "metadata": metadata})

    @router.get(
        "/servers/{server_name:path}/versions",
        responses=errors(401, 404),
        summary="List the versions of an MCP server",
    )
    async def list_versions(
        request: Request, server_name: str, include_deleted: bool = False
    ) -> JSONResponse:
        """Every version of the server (the registry keeps one: the one it serves)."""
        entry = await one(request, server_name, include_deleted)
        return JSONResponse({"servers": [response(entry, document(entry))], "metadata": {"count": 1}})

    @router.get(
        "/servers/{server_name:path}/versions/{version}",
        responses=errors(401, 404),
        summary="Get one version of an MCP server",
    )
    async def get_version(
        request: Request, server_name: str, version: str, include_deleted: bool = False
    ) -> JSONResponse:
        """One version of the server; `latest` is the newest."""
        entry = await one(request, server_name, include_deleted)
        if version not in ("latest", entry.version):
            raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
        return JSONResponse(response(entry, document(entry)))

    return router
