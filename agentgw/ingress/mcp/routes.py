"""The MCP URLs: which path is served how.

/mcp                 the merged catalog of every enabled server (bridge, prefixed names)
/mcp/<virtual>       a virtual server (bridge)
/mcp/<server>        streamable-HTTP upstream: pass-through; stdio or SSE upstream: bridge

Credentials are checked first, before anything that depends on the name: without valid ones, a name
the gateway serves and one it does not answer alike (the same 401, whose challenge names the same
metadata URL), so server names cannot be enumerated anonymously.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from starlette.types import Receive, Scope, Send

from agentgw.call import Call, Reply
from agentgw.errors import GatewayError, NotFound, Unauthenticated
from agentgw.filters.authenticate import Authenticate
from agentgw.ingress.mcp.bridge import Bridge, Endpoint
from agentgw.ingress.mcp.messages import MODERN_VERSION
from agentgw.ingress.mcp.passthrough import PassThrough, header_map
from agentgw.ingress.mcp.rendering import jsonrpc_error_response
from agentgw.pipeline import Pipeline
from registry.models import NAME_PATTERN
from registry.store import RegistryStore

__all__ = ["McpIngress"]


def _modern(headers: Mapping[str, str]) -> bool:
    version = headers.get("mcp-protocol-version", "").strip()
    return version >= MODERN_VERSION


class McpIngress:
    """ASGI app for `/mcp` and `/mcp/{name}`."""

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str | None = scope.get("path_params", {}).get("server")
        headers = header_map(scope)
        try:
            if name is not None and not NAME_PATTERN.fullmatch(name):
                raise NotFound(f"unknown MCP server {name!r}")  # no registered name looks like this
            path = "/mcp" if name is None else f"/mcp/{name}"
            try:
                principal = await self._authenticate.principal(headers.get("authorization"), endpoint=path)
            except Unauthenticated as exc:
                await self._audit_refusal(scope, headers, name, path)
                raise exc
            if name is None:
                endpoint = Endpoint.merged(self._registry.servers())
            else:
                spec = self._registry.server(name)
                if (
                    spec is not None
                    and spec.transport == "streamable-http"
                    and not (_modern(headers) and self._bridge.speaks_only_legacy(spec.name))
                ):
                    await self._passthrough.serve(scope, receive, send, spec, headers, principal)
                    return
                virtual = self._registry.virtual_server(name)
                if spec is not None:
                    endpoint = Endpoint.single(spec)
                elif virtual is not None:
                    endpoint = Endpoint.virtual(virtual)
                else:
                    raise NotFound(f"unknown MCP server {name!r}")
            await self._bridge.asgi(scope, receive, send, endpoint, principal, headers)
        except GatewayError as exc:
            await jsonrpc_error_response(None, exc)(scope, receive, send)

    async def _audit_refusal(
        self, scope: Scope, headers: Mapping[str, str], name: str | None, path: str
    ) -> None:
        """Have the pipeline refuse (and so audit) the credentials ingress has just refused.

        Every MCP request used to reach the pipeline's identity stage, which writes the refusal's audit
        record; refusing at ingress must not lose it. The answer stays ingress's own.
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
