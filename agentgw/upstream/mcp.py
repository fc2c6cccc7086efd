"""HTTP client for streamable-HTTP MCP upstreams: one pooled keep-alive client, messages sent as data."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from agentgw.errors import UpstreamError, UpstreamTimeout

__all__ = ["FORWARDED_REQUEST_HEADERS", "McpHttpUpstream"]

# What a client may say to an upstream through the gateway. Authorization is never among them:
# the credentials stage supplies the upstream's own credential.
FORWARDED_REQUEST_HEADERS = ("accept", "mcp-protocol-version", "mcp-method", "mcp-name", "last-event-id")


class McpHttpUpstream:
    """Sends one HTTP request to an upstream and returns the streaming response, errors mapped."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        upstream: str,
    ) -> httpx.Response:
        """Send and return the response with its body still unread (stream it, then close it).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the upstream cannot be reached.
        """
        request = self._client.build_request(
            method, url, headers=headers, content=body, timeout=httpx.Timeout(timeout_s, connect=5.0)
        )
        try:
            return await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream {upstream!r} did not answer within {timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {upstream!r} is unreachable") from exc


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The client's MCP headers that travel upstream (plus unknown `Mcp-Param-*`, as the spec asks)."""
    # Values are trimmed: surrounding whitespace is not part of a field value (RFC 9110 5.5).
    out = {name: incoming[name].strip(" \t") for name in FORWARDED_REQUEST_HEADERS if name in incoming}
    for name, value in incoming.items():
        if name.startswith("mcp-param-"):
            out[name] = value.strip(" \t")
    return out
