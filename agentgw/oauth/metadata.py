"""RFC 9728 protected resource metadata: what a client needs to get a token for an endpoint.

    GET /.well-known/oauth-protected-resource/mcp            the merged endpoint
    GET /.well-known/oauth-protected-resource/mcp/<name>     one server or virtual server
    GET /.well-known/oauth-protected-resource/admin          the admin API
    GET /.well-known/oauth-protected-resource/a2a/<agent>    an A2A agent; /v1 the LLM API
    GET /.well-known/oauth-protected-resource                the gateway as a whole

`resource` is the endpoint's canonical URI (the audience its tokens must carry); `scopes_supported`
lists the scopes the registry requires there (every server's for `/mcp`).

The documents are public, so they must not tell which names the gateway serves: every well-formed
`/mcp/<name>` has one, alike whether or not the name is served, and lists every scope any server
requires (as `/mcp` does). A client asks for all of them for that one audience; the authorization
server grants what it may, and a token that still lacks a server's scopes gets 403 `insufficient_scope`
naming them, once the caller has shown valid credentials.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from starlette.responses import JSONResponse

from agentgw.api_contract import errors
from agentgw.registry.models import NAME_PATTERN
from agentgw.registry.store import RegistryStore

__all__ = ["endpoint_scopes", "protected_resource_router"]


def endpoint_scopes(registry: RegistryStore, endpoint: str) -> list[str] | None:
    """The scopes `endpoint` requires, sorted; None if the gateway serves no such endpoint."""
    if endpoint in ("", "/admin", "/v1"):
        return []
    if endpoint.startswith("/a2a/"):
        # A2A agents declare no scopes (yet); any well-formed agent name is a protected resource.
        return [] if NAME_PATTERN.fullmatch(endpoint.removeprefix("/a2a/")) else None
    if endpoint == "/mcp":
        return sorted({s for spec in registry.servers() for s in spec.scopes})
    name = endpoint.removeprefix("/mcp/")
    if name == endpoint or not NAME_PATTERN.fullmatch(name):
        return None
    spec = registry.server(name)
    if spec is not None:
        return sorted(set(spec.scopes)) if spec.scopes else []
    virtual = registry.virtual_server(name)
    if virtual is None:
        return None
    # A virtual server needs what each server it draws from needs.
    servers = virtual.servers()
    return sorted({s for server in servers if (spec := registry.server(server)) for s in spec.scopes})


def protected_resource_router(
    base_url: str, registry: RegistryStore, authorization_servers: Callable[[], list[str]]
) -> APIRouter:
    """Public routes serving the protected resource metadata of every endpoint."""
    router = APIRouter(tags=["oauth"])
    base = base_url.rstrip("/")

    def document(endpoint: str) -> JSONResponse:
        name = endpoint.removeprefix("/mcp/")
        if name != endpoint and NAME_PATTERN.fullmatch(name):
            scopes: list[str] | None = endpoint_scopes(registry, "/mcp")  # the same for every name
        else:
            scopes = endpoint_scopes(registry, endpoint)
        if scopes is None:
            return JSONResponse({"detail": "no such protected resource"}, status_code=404)
        body = {
            "resource": f"{base}{endpoint}",
            "authorization_servers": authorization_servers(),
            "scopes_supported": scopes,
            "bearer_methods_supported": ["header"],
            "resource_name": f"agentgw {endpoint or '/'}",
        }
        return JSONResponse(body, headers={"Cache-Control": "max-age=60"})

    @router.get("/.well-known/oauth-protected-resource")
    async def gateway_metadata() -> JSONResponse:
        return document("")

    @router.get("/.well-known/oauth-protected-resource/{path:path}", responses=errors(404))
    async def endpoint_metadata(path: str) -> JSONResponse:
        return document("/" + path.rstrip("/"))

    return router
