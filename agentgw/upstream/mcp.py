"""HTTP client for streamable-HTTP MCP upstreams: one pooled keep-alive client, messages sent as data.

aiohttp, not httpx: on the pass-through hot path httpx's connection pool cost 0.6 to 1.3 ms of CPU per
request here, aiohttp 0.07 to 0.17 ms (bench/RESULTS.md). Nothing outside this module sees aiohttp:
callers get an `UpstreamResponse` and gateway errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp

from agentgw.errors import UpstreamError, UpstreamTimeout

__all__ = ["FORWARDED_REQUEST_HEADERS", "McpHttpUpstream", "UpstreamResponse"]

# What a client may say to an upstream through the gateway. Authorization is never among them:
# the credentials stage supplies the upstream's own credential.
FORWARDED_REQUEST_HEADERS = ("accept", "mcp-protocol-version", "mcp-method", "mcp-name", "last-event-id")
CONNECT_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 512


class UpstreamResponse:
    """An upstream's answer with its body unread: read it whole or stream it, then close it.

    Attributes:
        status_code: the HTTP status.
        headers: response headers, names lower-cased (a plain dict: the ingress rewrites session ids).
        url: the URL the request went to, for logs.
    """

    __slots__ = ("_response", "_upstream", "headers", "status_code", "url")

    def __init__(self, response: aiohttp.ClientResponse, upstream: str) -> None:
        self._response = response
        self._upstream = upstream
        self.status_code = response.status
        self.headers = {name.lower(): value for name, value in response.headers.items()}
        self.url = str(response.url)

    async def aread(self) -> bytes:
        """The whole body.

        Raises:
            UpstreamError: the upstream broke off or stalled its answer.
        """
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"upstream {self._upstream!r} broke off its answer") from exc

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (SSE streams pass through chunk by chunk).

        Raises:
            UpstreamError: the upstream broke off or stalled the stream.
        """
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"upstream {self._upstream!r} broke off its stream") from exc

    async def aclose(self) -> None:
        """Give the connection back to the pool (fully read) or close it (not fully read)."""
        self._response.release()


class McpHttpUpstream:
    """Sends one HTTP request to an upstream and returns the streaming response, errors mapped."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._max_connections = max_connections
        # aiohttp sessions belong to an event loop: made on first use, inside the running loop.
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                # Upstreams are near: compression would cost CPU on both sides, and the gateway
                # forwards bodies without a Content-Encoding.
                skip_auto_headers=("Accept-Encoding",),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            # Like a per-read timeout: a long SSE stream is fine as long as it keeps talking.
            timeout = aiohttp.ClientTimeout(
                total=None, connect=timeout_s, sock_connect=CONNECT_TIMEOUT_S, sock_read=timeout_s
            )
            self._timeouts[timeout_s] = timeout
        return timeout

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        upstream: str,
    ) -> UpstreamResponse:
        """Send and return the response with its body still unread (stream it, then close it).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the upstream cannot be reached.
        """
        try:
            response = await self._client().request(
                method,
                url,
                headers=headers,
                data=body,
                timeout=self._timeout(timeout_s),
                allow_redirects=False,
                auto_decompress=True,
            )
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included (also a ClientError)
            raise UpstreamTimeout(f"upstream {upstream!r} did not answer within {timeout_s:g}s") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamError(f"upstream {upstream!r} is unreachable") from exc
        return UpstreamResponse(response, upstream)


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The client's MCP headers that travel upstream (plus unknown `Mcp-Param-*`, as the spec asks)."""
    # Values are trimmed: surrounding whitespace is not part of a field value (RFC 9110 5.5).
    out = {name: incoming[name].strip(" \t") for name in FORWARDED_REQUEST_HEADERS if name in incoming}
    for name, value in incoming.items():
        if name.startswith("mcp-param-"):
            out[name] = value.strip(" \t")
    return out
