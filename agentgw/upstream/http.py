"""The HTTP client of every per-call upstream (MCP pass-through, A2A agents, LLM providers).

aiohttp, not httpx: on the hot path httpx's connection pool cost 0.6 to 1.3 ms of CPU per request
here, aiohttp 0.07 to 0.17 ms (bench/RESULTS.md, decision 0501). Nothing outside this module sees
aiohttp: callers get an `UpstreamResponse` and gateway errors whose messages start with the `who`
they name (`upstream 'github'`, `A2A agent 'planner'`, `model 'fast': the provider`).

Each upstream (each `who`) has two lanes of connections, bounded apart (`UpstreamLimits`): calls,
and streams (SSE answers, which may stay open for as long as a task runs). A request takes a place
in its lane before it is sent and gives it back when its answer is read or closed; with the lane full
for longer than a short wait it is refused as `UpstreamBusy` without being sent. So open streams
never take the connections that calls need, and no upstream takes another's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from agentgw.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from agentgw.registry.models import UpstreamLimits
from agentgw.tracing import outbound_headers

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_LIMITS",
    "AnswerTooLarge",
    "HttpClient",
    "Limits",
    "UpstreamResponse",
    "UpstreamState",
]

CONNECT_TIMEOUT_S = 5.0
# Told to a caller refused as busy: lanes free up as calls end, so a second later is a fair retry.
BUSY_RETRY_AFTER_S = "1"


class AnswerTooLarge(UpstreamError):
    """The upstream's body is larger than the reader's cap."""


@dataclass(frozen=True, slots=True)
class Limits:
    """`UpstreamLimits` with every field resolved."""

    max_connections: int
    max_streams: int
    connect_wait_s: float
    max_answer_bytes: int

    def over(self, *layers: UpstreamLimits | None) -> Limits:
        """These limits with each field the first of `layers` sets (most specific first) put over them."""
        values = {}
        for name in ("max_connections", "max_streams", "connect_wait_s", "max_answer_bytes"):
            value = next(
                (v for v in (getattr(x, name) for x in layers if x is not None) if v is not None), None
            )
            values[name] = getattr(self, name) if value is None else value
        return Limits(**values)


DEFAULT_LIMITS = Limits(
    max_connections=256, max_streams=512, connect_wait_s=1.0, max_answer_bytes=16 * 1024 * 1024
)


@dataclass(frozen=True, slots=True)
class UpstreamState:
    """What the last request to an upstream found: `ok`, or the reason it failed; `at` is epoch seconds."""

    ok: bool
    detail: str
    at: float


class _Lanes:
    """One upstream's places for calls and for streams."""

    __slots__ = ("calls", "limits", "source", "streams")

    def __init__(self, limits: Limits, source: UpstreamLimits | None) -> None:
        self.limits = limits
        self.source = source  # the spec's limits these were resolved from (checked by identity)
        self.calls = asyncio.Semaphore(limits.max_connections)
        self.streams = asyncio.Semaphore(limits.max_streams)


async def _take(lane: asyncio.Semaphore, wait_s: float, refusal: str) -> asyncio.Semaphore:
    if not lane.locked():
        await lane.acquire()  # a free place: returns without suspending
        return lane
    try:
        async with asyncio.timeout(wait_s):
            await lane.acquire()
    except TimeoutError:
        raise UpstreamBusy(refusal, headers={"retry-after": BUSY_RETRY_AFTER_S}) from None
    return lane


class UpstreamResponse:
    """An upstream's answer with its body unread: read it whole or stream it, then close it.

    Attributes:
        status_code: the HTTP status.
        headers: response headers, names lower-cased (a plain dict: the ingress rewrites session ids).
        url: the URL the request went to, for logs.
    """

    __slots__ = ("_lanes", "_place", "_response", "_who", "headers", "status_code")

    def __init__(
        self, response: aiohttp.ClientResponse, who: str, lanes: _Lanes, place: asyncio.Semaphore
    ) -> None:
        self._response = response
        self._who = who
        self._lanes = lanes
        self._place: asyncio.Semaphore | None = place
        self.status_code = response.status
        self.headers = {name.lower(): value for name, value in response.headers.items()}

    @property
    def max_answer_bytes(self) -> int:
        """The largest answer from this upstream that the gateway reads whole (or relays as one event)."""
        return self._lanes.limits.max_answer_bytes

    def _free(self) -> None:
        place, self._place = self._place, None
        if place is not None:
            place.release()

    def __del__(self) -> None:
        # A safety net, not the way: an answer dropped unclosed (a bug) must not keep its upstream's
        # place forever, or the upstream would stay "busy" for good.
        if getattr(self, "_place", None) is not None:
            self._free()

    async def as_stream(self) -> None:
        """Move this answer from the calls lane to the streams lane: it is about to be relayed as a
        stream that may stay open for long, and must not hold a place that calls need.

        Raises:
            UpstreamBusy: the upstream's streams stayed all open for the short wait (close the answer).
        """
        lanes = self._lanes
        if self._place is lanes.streams:
            return
        limits = lanes.limits
        refusal = f"{self._who} is busy: its {limits.max_streams} streams are all open"
        try:
            place = await _take(lanes.streams, limits.connect_wait_s, refusal)
        except UpstreamBusy as exc:
            exc.maybe_sent = True  # the upstream has started this call: the budget keeps it charged
            raise
        self._free()
        self._place = place

    @property
    def url(self) -> str:
        # Only logs ask for it: not built on every answer.
        return str(self._response.url)

    async def aread(self, max_bytes: int | None = None) -> bytes:
        """The whole body, at most `max_bytes` (by default `max_answer_bytes`): reading stops as soon
        as the body is larger, or before it starts when the declared length is.

        Raises:
            AnswerTooLarge: the body is larger than `max_bytes`.
            UpstreamTimeout: the upstream went silent for longer than the read timeout.
            UpstreamError: the upstream broke off its answer.
        """
        response = self._response
        if max_bytes is None:
            max_bytes = self._lanes.limits.max_answer_bytes
        too_large = f"{self._who} answered more than {max_bytes} bytes, more than the gateway reads whole"
        try:
            length = response.content_length
            if length is not None and "content-encoding" not in self.headers:
                if length > max_bytes:
                    raise AnswerTooLarge(too_large)
                # A declared length aiohttp enforces (nothing to decompress) needs no counting.
                body = await response.read()
                self._free()
                return body
            buffer = bytearray()
            async for chunk in response.content.iter_any():
                buffer += chunk
                if len(buffer) > max_bytes:
                    raise AnswerTooLarge(too_large)
            self._free()
            return bytes(buffer)
        # An answer that could not be read whole is of no use to anyone: it is closed here, so that a
        # caller that lets the error pass leaks neither its connection nor its lane place.
        except AnswerTooLarge:
            await self.aclose()
            raise
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included (also a ClientError)
            await self.aclose()
            raise UpstreamTimeout(f"{self._who} stalled its answer") from exc
        except aiohttp.ClientError as exc:
            await self.aclose()
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
        self._free()

    async def aclose(self) -> None:
        """Give the connection back to the pool (fully read) or close it (not fully read: the
        upstream sees the caller go away), and its place in the upstream's lane; idempotent."""
        self._response.release()
        self._free()


class HttpClient:
    """One pooled keep-alive client: sends a request and returns the response unread, errors mapped.

    `limits` are the gateway-wide ones; a request may put its upstream's own over them.
    """

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        # aiohttp sessions belong to an event loop: made on first use, inside the running loop.
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float, bool], aiohttp.ClientTimeout] = {}
        # By `who`: upstreams are configured, never named by callers, so this stays small.
        self._lanes: dict[str, _Lanes] = {}
        self._states: dict[str, UpstreamState] = {}

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each upstream found (for readiness; nothing is probed)."""
        return dict(self._states)

    def _lanes_of(self, who: str, limits: UpstreamLimits | None) -> _Lanes:
        lanes = self._lanes.get(who)
        if lanes is not None and lanes.source is limits:
            return lanes
        resolved = self._limits.over(limits)
        if lanes is None or lanes.limits != resolved:
            # Limits changed (a registry edit): calls in flight finish on the old lanes.
            lanes = _Lanes(resolved, limits)
            self._lanes[who] = lanes
        lanes.source = limits
        return lanes

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # No pool-wide limit: each upstream's lanes bound its connections, and a request waiting
                # in aiohttp's queue would only time out where a full lane answers "busy" at once.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
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
        stream: bool = False,
        limits: UpstreamLimits | None = None,
    ) -> UpstreamResponse:
        """Send and return the response with its body still unread (read or stream it, then close it).

        Args:
            who: names the upstream in error messages, e.g. `upstream 'github'`; also the key of its lanes.
            read_timeout: False for streams that may stay silent for long (A2A task updates).
            stream: the answer is a stream (it takes a place in the streams lane, not the calls lane).
            limits: the upstream's own limits, over the client's.

        Raises:
            UpstreamBusy: no place in the upstream's lane within its `connect_wait_s`; nothing was sent.
            UpstreamUnreachable: no connection could be made; nothing was sent.
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the connection broke after the request may have been sent.
        """
        lanes = self._lanes_of(who, limits)
        resolved = lanes.limits
        if stream:
            refusal = f"{who} is busy: its {resolved.max_streams} streams are all open"
            place = await _take(lanes.streams, resolved.connect_wait_s, refusal)
        else:
            refusal = f"{who} is busy: its {resolved.max_connections} connections are all in use"
            place = await _take(lanes.calls, resolved.connect_wait_s, refusal)
        # Upstreams are near: compression would cost CPU on both sides, and the gateway forwards bodies
        # without a Content-Encoding. Said outright (no header would leave the upstream free to
        # compress, RFC 9110 12.5.3), which also spares aiohttp its own default per request.
        headers = {**headers, "accept-encoding": "identity"}
        # W3C trace context: the gateway's upstream span, or the caller's own headers passed on.
        traced = outbound_headers()
        if traced is not None:
            headers.update(traced)
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
            place.release()
            self._states[who] = UpstreamState(False, "no connection in time", time.time())
            raise UpstreamUnreachable(f"{who} did not accept a connection within {timeout_s:g}s") from exc
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included (also a ClientError)
            place.release()
            self._states[who] = UpstreamState(False, "no answer in time", time.time())
            raise UpstreamTimeout(f"{who} did not answer within {timeout_s:g}s") from exc
        except (aiohttp.ClientConnectorError, ValueError) as exc:  # aiohttp.InvalidURL is a ValueError
            place.release()
            self._states[who] = UpstreamState(False, "unreachable", time.time())
            raise UpstreamUnreachable(f"{who} is unreachable") from exc
        except (aiohttp.ClientError, OSError) as exc:
            place.release()
            self._states[who] = UpstreamState(False, "connection broken", time.time())
            raise UpstreamError(f"{who} broke off the connection") from exc
        except BaseException:
            place.release()  # cancelled while sending
            raise
        status = response.status
        if status >= 500:
            self._states[who] = UpstreamState(False, f"answered HTTP {status}", time.time())
        else:
            known = self._states.get(who)
            if known is None or not known.ok:  # `at` says since when it has been answering
                self._states[who] = UpstreamState(True, "", time.time())
        return UpstreamResponse(response, who, lanes, place)
