"""The HTTP client of every per-call upstream (MCP pass-through, A2A agents, LLM providers).

aiohttp, not httpx: on the hot path httpx's connection pool cost 0.6 to 1.3 ms of CPU per request
here, aiohttp 0.07 to 0.17 ms (bench/RESULTS.md, decision 0501). Nothing outside this module sees
aiohttp: callers get an `UpstreamResponse` and gateway errors whose messages start with the `who`
they name (`upstream 'github'`, `A2A agent 'planner'`, `model 'fast': the provider`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp

from agentgw.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable

__all__ = ["CONNECT_TIMEOUT_S", "MAX_CONNECTIONS", "AnswerTooLarge", "HttpClient", "UpstreamResponse"]

CONNECT_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 512


class AnswerTooLarge(UpstreamError):
    """The upstream's body is larger than the reader's cap."""


class UpstreamResponse:
    """An upstream's answer with its body unread: read it whole or stream it, then close it.

    Attributes:
        status_code: the HTTP status.
        headers: response headers, names lower-cased (a plain dict: the ingress rewrites session ids).
        url: the URL the request went to, for logs.
    """

    __slots__ = ("_response", "_who", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse, who: str) -> None:
        self._response = response
        self._who = who
        self.status_code = response.status
        self.headers = {name.lower(): value for name, value in response.headers.items()}

    @property
    def url(self) -> str:
        # Only logs ask for it: not built on every answer.
        return str(self._response.url)

    async def aread(self, max_bytes: int | None = None) -> bytes:
        """The whole body; with `max_bytes`, reading stops as soon as the body is larger.

        Raises:
            AnswerTooLarge: the body is larger than `max_bytes`.
            UpstreamTimeout: the upstream went silent for longer than the read timeout.
            UpstreamError: the upstream broke off its answer.
        """
        response = self._response
        try:
            # A declared length aiohttp enforces (nothing to decompress) needs no counting.
            if max_bytes is None or (
                response.content_length is not None
                and response.content_length <= max_bytes
                and "content-encoding" not in self.headers
            ):
                return await response.read()
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > max_bytes:
                    raise AnswerTooLarge(f"{self._who} answered more than {max_bytes} bytes")
            return bytes(body)
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included (also a ClientError)
            raise UpstreamTimeout(f"{self._who} stalled its answer") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self._who} broke off its answer") from exc

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (SSE streams pass through chunk by chunk).

        Raises:
            UpstreamTimeout: the upstream went silent for longer than the read timeout.
            UpstreamError: the upstream broke off the stream.
        """
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{self._who} stalled mid-stream") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self._who} broke off the stream") from exc

    async def aclose(self) -> None:
        """Give the connection back to the pool (fully read) or close it (not fully read: the
        upstream sees the caller go away)."""
        self._response.release()


class HttpClient:
    """One pooled keep-alive client: sends a request and returns the response unread, errors mapped."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._max_connections = max_connections
        # aiohttp sessions belong to an event loop: made on first use, inside the running loop.
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float, bool], aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _timeout(self, timeout_s: float, connect_s: float, read_timeout: bool) -> aiohttp.ClientTimeout:
        key = (timeout_s, connect_s, read_timeout)
        timeout = self._timeouts.get(key)
        if timeout is None:
            # Nothing waits longer than `timeout_s` for a connection (the pool's wait included), a TCP
            # connect at most `connect_s`; the read timeout is per read, so a long stream is fine as
            # long as it keeps talking (and a stream without one may stay silent).
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=timeout_s,
                sock_connect=min(connect_s, timeout_s),
                sock_read=timeout_s if read_timeout else None,
            )
            self._timeouts[key] = timeout
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
        *,
        timeout_s: float,
        who: str,
        connect_s: float = CONNECT_TIMEOUT_S,
        read_timeout: bool = True,
    ) -> UpstreamResponse:
        """Send and return the response with its body still unread (read or stream it, then close it).

        Args:
            who: names the upstream in error messages, e.g. `upstream 'github'`.
            read_timeout: False for streams that may stay silent for long (A2A task updates).

        Raises:
            UpstreamUnreachable: no connection could be made; nothing was sent.
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the connection broke after the request may have been sent.
        """
        # Upstreams are near: compression would cost CPU on both sides, and the gateway forwards bodies
        # without a Content-Encoding. Said outright (no header would leave the upstream free to
        # compress, RFC 9110 12.5.3), which also spares aiohttp its own default per request.
        headers = {**headers, "accept-encoding": "identity"}
        try:
            response = await self._client().request(
                method,
                url,
                headers=headers,
                data=body,
                timeout=self._timeout(timeout_s, connect_s, read_timeout),
                allow_redirects=False,
                auto_decompress=True,
            )
        # Whether the request may have left decides whether budgets charge it (errors.py): only a
        # failure to connect (refused, no such host, TLS handshake, no connection in time) or a request
        # that could not be built proves it did not; a timeout or break after that may not.
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnreachable(f"{who} did not accept a connection within {timeout_s:g}s") from exc
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included (also a ClientError)
            raise UpstreamTimeout(f"{who} did not answer within {timeout_s:g}s") from exc
        except (aiohttp.ClientConnectorError, ValueError) as exc:  # aiohttp.InvalidURL is a ValueError
            raise UpstreamUnreachable(f"{who} is unreachable") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{who} broke off the connection") from exc
        return UpstreamResponse(response, who)
