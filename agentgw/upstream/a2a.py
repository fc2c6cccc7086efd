"""A2A agents on the wire: the request to the agent, its SSE answer read event by event, its card.

One pooled keep-alive client (`agentgw.upstream.http`, shared with MCP and LLM upstreams); messages
travel as data, never rebuilt. This module decides nothing: which agent, which URL, which credential
and whether the caller may ask are the ingress's and the pipeline's; here they become headers.

Streams (`SendStreamingMessage`, `SubscribeToTask`) get no read timeout: a task may stay silent for a
long time, and the stream ends when the agent ends it or the caller goes away (the ingress then
closes the upstream response).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import orjson

from agentgw.call import RUN_ID_HEADER
from agentgw.errors import UpstreamError
from agentgw.registry.models import UpstreamLimits
from agentgw.upstream.http import AnswerTooLarge, HttpClient, UpstreamResponse, UpstreamState
from agentgw.upstream.sse import EventTooLarge as SseEventTooLarge
from agentgw.upstream.sse import SseSplitter

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "MAX_CARD_BYTES",
    "MAX_EVENT_BYTES",
    "A2aHttpUpstream",
    "AgentEvent",
    "EventTooLarge",
    "forwarded_headers",
    "read_agent_events",
]

# A2A service parameters a caller may send to the agent through the gateway (`X-A2A-Extensions` is
# the 0.3 spelling). Authorization is never among them: the agent gets the credential the credentials
# stage obtained. `Agent-Run-Id` travels on so that an agent calling others can keep them in the same run.
FORWARDED_REQUEST_HEADERS = (
    "a2a-version",
    "a2a-extensions",
    "x-a2a-extensions",
    "last-event-id",
    RUN_ID_HEADER,
)
MAX_CARD_BYTES = 1024 * 1024
# One event is buffered whole before it is relayed: an agent must not make the gateway hold more.
MAX_EVENT_BYTES = 8 * 1024 * 1024
_CARD_HEADERS = {"accept": "application/json"}
_STREAM_ACCEPT = "text/event-stream, application/json"


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The caller's A2A headers that travel upstream."""
    return {name: incoming[name] for name in FORWARDED_REQUEST_HEADERS if name in incoming}


class EventTooLarge(AnswerTooLarge):
    """One event of an agent's stream is larger than the gateway buffers."""


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """One server-sent event of an agent's answer.

    Attributes:
        raw: the event block as the agent sent it, without the blank line that ended it; relayed as is.
        name: its `event` field (`message` when it has none).
        data: its `data` lines joined by newlines; None when it has none.
    """

    raw: bytes = field(repr=False)
    name: str = "message"
    data: bytes | None = field(default=None, repr=False)


async def read_agent_events(
    response: UpstreamResponse, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncGenerator[AgentEvent, None]:
    """The events of an agent's SSE answer, each as soon as it is complete, read by the gateway's one
    SSE reader (`upstream/sse.py`).

    An event keeps its raw bytes without its blank line (the relay forwards them as they came, and
    comment-only events such as keep-alives go through too); an unterminated last event is dropped,
    and so are blocks with nothing in them.

    Raises:
        EventTooLarge: one event is larger than `max_event_bytes`.
        UpstreamError: the connection broke (`UpstreamTimeout`: the agent went silent past its read
            timeout).
    """
    splitter = SseSplitter(max_event_bytes)
    async for chunk in response.aiter_raw():
        try:
            raws = splitter.feed(chunk)
        except SseEventTooLarge as exc:
            raise EventTooLarge("the agent sent a stream event larger than the gateway accepts") from exc
        for raw in raws:
            block = raw.rstrip(b"\r\n")
            if not block.strip():
                continue
            event = splitter.parse(raw)
            yield AgentEvent(block, event.event, event.data) if event else AgentEvent(block)


class A2aHttpUpstream:
    """Sends requests to agents and fetches their cards, with transport errors mapped to `UpstreamError`."""

    def __init__(self, http: HttpClient | None = None) -> None:
        self._http = http or HttpClient()

    async def aclose(self) -> None:
        await self._http.aclose()

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each agent found."""
        return self._http.states()

    async def send(
        self,
        method: str,
        url: str,
        incoming: Mapping[str, str],
        body: bytes | None,
        *,
        credential: tuple[str, str] | None,
        timeout_s: float,
        stream: bool,
        agent: str,
        limits: UpstreamLimits | None = None,
    ) -> UpstreamResponse:
        """Send one request: the caller's A2A headers (`incoming`), `credential` as a `(header, value)`
        pair, the body as it came; the response comes back unread (read or stream it, then close it).

        Raises:
            UpstreamBusy: no connection to the agent free within its short wait; nothing was sent.
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the agent cannot be reached.
        """
        headers = forwarded_headers(incoming)
        headers["accept"] = _STREAM_ACCEPT if stream else "application/json"
        if body is not None:
            headers["content-type"] = "application/json"
        if credential is not None:
            headers[credential[0]] = credential[1]
        return await self._http.send(
            method,
            url,
            headers,
            body,
            timeout_s=timeout_s,
            who=f"A2A agent {agent!r}",
            read_timeout=not stream,
            stream=stream,
            limits=limits,
        )

    async def fetch_card(self, url: str, timeout_s: float) -> object:
        """GET an agent card and parse it (at most `MAX_CARD_BYTES`).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: unreachable, not HTTP 200, too large, or not JSON.
        """
        response = await self._http.send("GET", url, _CARD_HEADERS, None, timeout_s=timeout_s, who=url)
        try:
            if response.status_code != 200:
                raise UpstreamError(f"{url} answered HTTP {response.status_code}")
            body = await response.aread(MAX_CARD_BYTES)
        finally:
            await response.aclose()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{url} answered something that is not JSON") from exc
