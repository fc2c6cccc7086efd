"""HTTP client for streamable-HTTP MCP upstreams: one pooled keep-alive client, messages sent as data.

The client itself is `agentgw.upstream.http` (aiohttp behind `UpstreamResponse`, decision 0501),
shared with the A2A and LLM upstreams; this module adds what is MCP's: which headers travel.
"""

from __future__ import annotations

from collections.abc import Mapping

from agentgw.registry.models import UpstreamLimits
from agentgw.upstream.http import DEFAULT_LIMITS, HttpClient, Limits, UpstreamResponse, UpstreamState

__all__ = ["FORWARDED_REQUEST_HEADERS", "McpHttpUpstream", "UpstreamResponse", "forwarded_headers"]

# What a client may say to an upstream through the gateway. Authorization is never among them:
# the credentials stage supplies the upstream's own credential.
FORWARDED_REQUEST_HEADERS = ("accept", "mcp-protocol-version", "mcp-method", "mcp-name", "last-event-id")


class McpHttpUpstream:
    """Sends one HTTP request to an upstream and returns the streaming response, errors mapped."""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._http = HttpClient(limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each upstream found."""
        return self._http.states()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        upstream: str,
        *,
        limits: UpstreamLimits | None = None,
        stream: bool = False,
    ) -> UpstreamResponse:
        """Send and return the response with its body still unread (stream it, then close it).

        Raises:
            UpstreamBusy: no connection to the upstream free within its short wait; nothing was sent.
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the upstream cannot be reached.
        """
        return await self._http.send(
            method,
            url,
            headers,
            body,
            timeout_s=timeout_s,
            who=f"upstream {upstream!r}",
            limits=limits,
            stream=stream,
        )


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The client's MCP headers that travel upstream (plus unknown `Mcp-Param-*`, as the spec asks)."""
    # Values are trimmed: surrounding whitespace is not part of a field value (RFC 9110 5.5).
    out = {name: incoming[name].strip(" \t") for name in FORWARDED_REQUEST_HEADERS if name in incoming}
    for name, value in incoming.items():
        if name.startswith("mcp-param-"):
            out[name] = value.strip(" \t")
    return out
