"""The MCP URLs: which path is served how.

/mcp                 the merged catalog of every enabled server (bridge, prefixed names)
/mcp/<virtual>       a virtual server (bridge)
/mcp/<server>        streamable-HTTP upstream: pass-through; stdio or SSE upstream: bridge
/mcp/_sse, /mcp/_messages                the HTTP+SSE transport (2024-11-05) of /mcp (bridge)
/mcp/<name>/sse, /mcp/<name>/messages    the same for any server or virtual server (bridge)

Credentials are checked first, before anything that depends on the name: without valid ones, a name
the gateway serves and one it does not answer alike (the same 401, whose challenge names the same
metadata URL), so server names cannot be enumerated anonymously. The HTTP+SSE legs belong to their
endpoint: credentials are checked for it (its token audience, its challenge and metadata).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from agentgw.call import Call, Reply
from agentgw.errors import GatewayError, NotFound, Unauthenticated
from agentgw.filters.authenticate import Authenticate
from agentgw.ingress.mcp.bridge import Bridge, Endpoint
from agentgw.ingress.mcp.legacy_sse import LEGS, MERGED_LEGS, method_not_allowed
from agentgw.ingress.mcp.messages import MODERN_VERSION
from agentgw.ingress.mcp.passthrough import PassThrough, header_map
from agentgw.ingress.mcp.rendering import jsonrpc_error_response
from agentgw.pipeline import Pipeline
from agentgw.registry.models import NAME_PATTERN
from agentgw.registry.store import RegistryStore

__all__ = ["METHODS", "McpIngress", "McpRoute", "path_params"]

METHODS = frozenset({"GET", "POST", "DELETE"})


def _modern(headers: Mapping[str, str]) -> bool:
    version = headers.get("mcp-protocol-version", "").strip()
    return version >= MODERN_VERSION


def path_params(path: str) -> dict[str, str] | None:
    """The parameters of an MCP URL: `server` (absent for `/mcp`), and `leg` for the HTTP+SSE
    transport ("sse" or "messages"); None when `path` is no MCP URL."""
    if path == "/mcp":
        return {}
    if not path.startswith("/mcp/"):
        return None
    name, slash, leg = path[5:].partition("/")
    if not name:
        return None
    if not slash:
        merged = MERGED_LEGS.get(name)
        return {"server": name} if merged is None else {"leg": merged}
    return {"server": name, "leg": leg} if leg in LEGS else None


class McpRoute(BaseRoute):
    """The route of every MCP URL, matched by `path_params`: a path pattern cannot tell a server's
    name from the merged endpoint's legs (`/mcp/_sse`), nor refuse an unknown leg.

    Only a full match is taken (a method of `METHODS`); anything else is left to the routes after it,
    which answer 404 or 405 as for any path.
    """

    def __init__(self, app: McpIngress) -> None:
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["method"] in METHODS:
            params = path_params(scope["path"])
            if params is not None:
                return Match.FULL, {"path_params": params}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)  # no named URL: nothing builds links to it


class McpIngress:
    """ASGI app for `/mcp`, `/mcp/{name}` and their HTTP+SSE legs."""

    def __init__(
        self,
        registry: RegistryStore,
        passthrough: PassThrough,
        bridge: Bridge,
        authenticate: Authenticate,
        pipeline: Pipeline,
    ) -> None:
        self._registry = registry
        self._passthrough = passthrough
        self._bridge = bridge
        self._authenticate = authenticate
        self._pipeline = pipeline
        # The merged catalog's endpoint, built once per registry snapshot rather than per request.
        self._merged: Endpoint | None = None
        registry.on_change(self._forget_merged)

    def _forget_merged(self) -> None:
        self._merged = None

    def _merged_endpoint(self) -> Endpoint:
        merged = self._merged
        if merged is None:
            merged = self._merged = Endpoint.merged(self._registry.servers())
        return merged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params: dict[str, str] = scope.get("path_params", {})
        name = params.get("server")
        leg = params.get("leg")
        headers = header_map(scope)
        try:
            if name is not None and not NAME_PATTERN.fullmatch(name):
                raise NotFound(f"unknown MCP server {name!r}")  # no registered name looks like this
            if leg is not None and scope["method"] != LEGS[leg]:
                await method_not_allowed(leg)(scope, receive, send)
                return
            path = "/mcp" if name is None else f"/mcp/{name}"
            try:
                principal = await self._authenticate.principal(headers.get("authorization"), endpoint=path)
            except Unauthenticated as exc:
                await self._audit_refusal(scope, headers, name, path)
                raise exc
            if name is None:
                endpoint = self._merged_endpoint()
            else:
                spec = self._registry.server(name)
                if (
                    leg is None
                    and spec is not None
                    and spec.transport == "streamable-http"
                    and not (_modern(headers) and self._bridge.speaks_only_legacy(spec.name))
                ):
                    await self._passthrough.serve(scope, receive, send, spec, headers, principal)
                    return
                virtual = self._registry.virtual_server(name)
                if spec is not None:
                    if leg is not None and spec.per_caller_credential:
                        # The bridge never carries a per-caller credential (decision 0602).
                        raise NotFound(
                            f"MCP server {name!r} is served over streamable HTTP only (its upstream "
                            f"credential is per caller): use /mcp/{name}"
                        )
                    endpoint = Endpoint.single(spec)
                elif virtual is not None:
                    endpoint = Endpoint.virtual(virtual)
                else:
                    raise NotFound(f"unknown MCP server {name!r}")
            if leg is not None:
                await self._bridge.legacy_sse(scope, receive, send, endpoint, principal, headers, leg)
                return
            await self._bridge.asgi(scope, receive, send, endpoint, principal, headers)
        except GatewayError as exc:
            await jsonrpc_error_response(None, exc)(scope, receive, send)

    async def _audit_refusal(
        self, scope: Scope, headers: Mapping[str, str], name: str | None, path: str
    ) -> None:
        """Have the pipeline refuse (and so audit) the credentials ingress has just refused.

        A refusal by the pipeline's identity stage is audited like any other outcome; a refusal at
        ingress must leave the same record. The answer stays ingress's own.
        """
        call = Call(
            protocol="mcp",
            action="session",
            resource=f"mcp:{name or '*'}",
            upstream=name or "*",
            method=f"HTTP {scope['method']}",
            credentials=headers.get("authorization"),
            endpoint=path,
            session_id=headers.get("mcp-session-id"),
        )

        async def terminal(_call: Call) -> Reply:
            raise Unauthenticated("authentication required")  # not reached: the identity stage refuses

        with contextlib.suppress(GatewayError):
            await self._pipeline.run(call, terminal)
