"""The MCP URLs: which path is served how.

/mcp                 the merged catalog of every enabled server (bridge, prefixed names)
/mcp/<virtual>       a virtual server (bridge)
/mcp/<server>        streamable-HTTP upstream: pass-through; stdio or SSE upstream: bridge
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import Receive, Scope, Send

from agentgw.errors import GatewayError, NotFound
from agentgw.filters.authenticate import Authenticate
from agentgw.ingress.mcp.bridge import Bridge, Endpoint
from agentgw.ingress.mcp.messages import MODERN_VERSION
from agentgw.ingress.mcp.passthrough import PassThrough, header_map
from agentgw.ingress.mcp.rendering import jsonrpc_error_response
from registry.store import RegistryStore

__all__ = ["McpIngress"]


def _modern(headers: Mapping[str, str]) -> bool:
    version = headers.get("mcp-protocol-version", "").strip()
    return version >= MODERN_VERSION


class McpIngress:
    """ASGI app for `/mcp` and `/mcp/{name}`."""

    def __init__(
        self, registry: RegistryStore, passthrough: PassThrough, bridge: Bridge, authenticate: Authenticate
    ) -> None:
        self._registry = registry
        self._passthrough = passthrough
        self._bridge = bridge
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str | None = scope.get("path_params", {}).get("server")
        headers = header_map(scope)
        try:
            if name is None:
                endpoint = Endpoint.merged(self._registry.servers())
            else:
                spec = self._registry.server(name)
                if (
                    spec is not None
                    and spec.transport == "streamable-http"
                    and not (_modern(headers) and self._bridge.speaks_only_legacy(spec.name))
                ):
                    await self._passthrough.serve(scope, receive, send, spec, headers)
                    return
                virtual = self._registry.virtual_server(name)
                if spec is not None:
                    endpoint = Endpoint.single(spec)
                elif virtual is not None:
                    endpoint = Endpoint.virtual(virtual)
                else:
                    raise NotFound(f"unknown MCP server {name!r}")
            # The SDK serves the bridged endpoints; refuse bad credentials before it sees the request,
            # so the OAuth challenge is an HTTP 401 whatever the message was.
            principal = await self._authenticate.principal(
                headers.get("authorization"), endpoint="/mcp" if name is None else f"/mcp/{name}"
            )
            await self._bridge.asgi(scope, receive, send, endpoint, principal, headers)
        except GatewayError as exc:
            await jsonrpc_error_response(None, exc)(scope, receive, send)
