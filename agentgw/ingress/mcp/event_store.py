"""The SSE events of the bridge's handshake-era sessions, kept so a client can resume a stream.

A 2025-11-25 client whose POST stream breaks reconnects with `Last-Event-ID` and gets what it missed
(the first event of each stream, with an id and no data, primes it for that). The events live in the
memory of the node that holds the session, bounded four ways: so many per stream, so many and so
many bytes in all (the oldest go first: an answer may be as large as the upstream's answer cap), and
none older than a few minutes. An event that is gone cannot be resumed
from: the client gets an empty stream, as after a restart.

Each session has its own store: the SDK's stream ids are request ids, which repeat from session to
session, and an event id of one session must never replay another's stream.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from mcp.server import Server
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamableHTTPServerTransport,
    StreamId,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types import JSONRPCMessage

__all__ = ["ResumableSessionManager", "SessionEvents"]

EVENTS_PER_STREAM = 256
EVENTS_IN_ALL = 10_000
BYTES_IN_ALL = 64 * 1024 * 1024
EVENT_TTL_S = 300.0
# How soon (ms) a client whose stream closed should come back, said in each stream's priming event.
RETRY_MS = 1000


@dataclass(frozen=True)
class _Event:
    session: str
    stream: StreamId
    message: JSONRPCMessage | None  # None: a priming event
    at: float
    size: int


class SessionEvents:
    """Every session's recent events on this node, within the bounds the constructor sets."""

    def __init__(
        self,
        *,
        per_stream: int = EVENTS_PER_STREAM,
        in_all: int = EVENTS_IN_ALL,
        ttl_s: float = EVENT_TTL_S,
        bytes_in_all: int = BYTES_IN_ALL,
    ) -> None:
        self._per_stream = per_stream
        self._in_all = in_all
        self._bytes_in_all = bytes_in_all
        self._bytes = 0
        self._ttl_s = ttl_s
        self._events: OrderedDict[EventId, _Event] = OrderedDict()  # oldest first
        self._streams: dict[str, dict[StreamId, deque[EventId]]] = {}  # session -> stream -> ids
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._events)

    @property
    def bytes(self) -> int:
        """The serialized size of the events kept."""
        return self._bytes

    def _forget(self, event_id: EventId) -> None:
        event = self._events.pop(event_id, None)
        if event is not None:
            self._bytes -= event.size

    def for_session(self, session_id: str) -> EventStore:
        """The store the SDK's transport of `session_id` writes to and replays from."""
        return _SessionStore(self, session_id)

    def drop(self, session_id: str) -> None:
        """Forget an ended session's events."""
        for ids in self._streams.pop(session_id, {}).values():
            for event_id in ids:
                self._forget(event_id)

    def store(self, session_id: str, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        now = time.monotonic()
        event_id = str(next(self._ids))
        size = len(message.model_dump_json(by_alias=True, exclude_none=True)) if message is not None else 0
        self._events[event_id] = _Event(session_id, stream_id, message, now, size)
        self._bytes += size
        ids = self._streams.setdefault(session_id, {}).setdefault(stream_id, deque())
        ids.append(event_id)
        if len(ids) > self._per_stream:
            self._forget(ids.popleft())
        self._expire(now)
        return event_id

    def _expire(self, now: float) -> None:
        while self._events:
            event_id, event = next(iter(self._events.items()))
            if (
                len(self._events) <= self._in_all
                and self._bytes <= self._bytes_in_all
                and now - event.at <= self._ttl_s
            ):
                return
            self._forget(event_id)
            streams = self._streams.get(event.session, {})
            ids = streams.get(event.stream)
            if ids and ids[0] == event_id:  # ids are increasing, so the oldest of all is its stream's
                ids.popleft()
            if ids is not None and not ids:
                del streams[event.stream]
                if not streams:
                    self._streams.pop(event.session, None)

    async def replay(self, session_id: str, last_event_id: EventId, send: EventCallback) -> StreamId | None:
        self._expire(time.monotonic())
        event = self._events.get(last_event_id)
        if event is None or event.session != session_id:
            return None  # gone, or not this session's: nothing to resume from
        ids = list(self._streams.get(session_id, {}).get(event.stream, ()))
        for event_id in ids[ids.index(last_event_id) + 1 :]:
            kept = self._events.get(event_id)
            if kept is not None and kept.message is not None:
                await send(EventMessage(kept.message, event_id))
        return event.stream


class _SessionStore(EventStore):
    """One session's view of `SessionEvents` (the SDK's interface)."""

    def __init__(self, events: SessionEvents, session_id: str) -> None:
        self._events = events
        self._session = session_id

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        return self._events.store(self._session, stream_id, message)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        return await self._events.replay(self._session, last_event_id, send_callback)


class ResumableSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, with a store of its own for each session's events.

    The SDK gives every session's transport the one store it was built with; these two overrides give
    each its own view, and forget a session's events when the SDK discards the session.
    """

    def __init__(
        self,
        app: Server[Any],
        *,
        events: SessionEvents,
        max_request_body_size: int,
        session_idle_timeout: float,
        max_sessions: int,
    ) -> None:
        super().__init__(
            app=app,
            retry_interval=RETRY_MS,
            max_request_body_size=max_request_body_size,
            session_idle_timeout=session_idle_timeout,
            max_sessions=max_sessions,
        )
        self.events = events

    def _admit_session(self, requestor: AuthorizationContext | None) -> StreamableHTTPServerTransport | None:
        transport = super()._admit_session(requestor)
        if transport is not None and transport.mcp_session_id is not None:
            transport._event_store = self.events.for_session(transport.mcp_session_id)
        return transport

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        self.events.drop(session_id)
        await super()._discard_session(session_id, transport)
