"""Server-sent events: the one reader of upstream streams and the one writer of the gateway's own.

The reader follows the WHATWG HTML rules for `text/event-stream`
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in LF, CRLF or CR; a blank line ends an event; a line starting with `:` is a comment; a
field's value loses one space after the colon, no more; `data` lines join with LF; `event`, `id`
and `retry` are fields too; an event without data is not dispatched; a leading BOM is ignored.

It works in two layers, because the gateway reads streams in two ways:
- `SseSplitter` cuts the bytes of a stream into whole events and returns each event's bytes exactly
  as they came. A relay (the MCP pass-through, A2A) forwards those bytes unchanged and only reads
  what it must watch, so a stream costs a search for blank lines, not a parse of every line.
- `SseSplitter.parse` reads one such event's fields, and `read_events` does both for a consumer
  that wants only the events (an LLM stream, a bridged MCP session).

Data stays bytes: every consumer parses it as JSON, and orjson reads bytes without a decoded copy.

One deliberate difference from a browser: a stream that ends after an event's last line but before
its blank line ends that event too (`SseSplitter.end`). Upstreams that close right after their last
event often leave the blank line out, and the connection's clean end says the event is complete; a
stream cut mid-way is an error of the HTTP client (a broken chunked body), never a clean end.

Nothing here knows an HTTP client: the reader takes byte chunks from any (`UpstreamResponse.aiter_raw`
for aiohttp, `aiter_bytes` for httpx), so every protocol reads the same way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from typing import NamedTuple

__all__ = [
    "EventTooLarge",
    "SseEvent",
    "SseSplitter",
    "encode_event",
    "parse_events",
    "read_events",
]

# Two line ends in a row: the end of an event. A CR counts as a line end of its own only when no LF
# follows it, so that the CR of a CRLF never makes `a\r\nb` look like a blank line.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
# A search resumed after more bytes arrived starts this far back: a blank line split across chunks
# (`\r\n` | `\r\n`) is at most 3 bytes before the new ones.
_OVERLAP = 3
_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(ValueError):
    """One event is larger than the reader's cap (the caller maps it to its protocol's error)."""


class SseEvent(NamedTuple):
    """One dispatched event (a tuple: made for every event of every stream, so made cheaply).

    Attributes:
        data: the `data` lines joined with LF (bytes: it is JSON for every consumer).
        event: the event type, `message` when the event names none.
        id: the stream's last event id at this event (ids persist from event to event), "" if none.
        retry: the reconnection time this event asked for, in milliseconds, if it did.
    """

    data: bytes
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SseSplitter:
    """Cuts a stream's bytes into events, and reads their fields.

    Args:
        max_event_bytes: the largest event accepted; a larger one (or an unfinished one that has
            already grown past it) raises `EventTooLarge`, so a stream never makes the gateway buffer
            without bound.
    """

    __slots__ = ("_cr", "_first", "_max", "_pending", "last_event_id")

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._pending = bytearray()  # grown in place: an event in many small chunks is not copied each time
        self._cr = False  # a CR seen: from then on, line ends need the regular expression
        self._first = True  # the BOM rule applies to the stream's first line only
        self.last_event_id = ""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completes, each with its blank line, exactly as received (empty ones too:
        joined, they are the stream's bytes so far).

        Raises:
            EventTooLarge: an event, finished or not, is larger than `max_event_bytes`.
        """
        pending = self._pending
        buffer: bytes | bytearray
        if pending:
            since = max(len(pending) - _OVERLAP, 0)
            pending += chunk
            buffer = pending
        else:
            # Nothing unfinished (the usual case): the chunk is searched and cut as it is, uncopied.
            since, buffer = 0, chunk
        if not self._cr and b"\r" in chunk:
            self._cr = True
        events: list[bytes] = []
        start = 0
        if self._cr:
            ends = [match.end() for match in _EVENT_END.finditer(buffer, since)]
        else:
            # LF only so far (most streams): a blank line is `\n\n`, found without the regex engine.
            ends = []
            at = buffer.find(b"\n\n", since)
            while at >= 0:
                ends.append(at + 2)
                at = buffer.find(b"\n\n", at + 2)
        for end in ends:
            if end - start > self._max:
                break  # refused below, once the events before it are out
            events.append(bytes(buffer[start:end]))
            start = end
        if buffer is chunk:
            if start < len(chunk):
                pending += chunk[start:]
        elif start:
            del pending[:start]
        if len(pending) > self._max and not events:
            # With events to return first, the next `feed` or `end` refuses: the stream goes no further.
            raise EventTooLarge(f"an event larger than {self._max} bytes")
        return events

    def end(self) -> bytes | None:
        """At the end of the stream: the last event if it came without its blank line (see the module's
        docstring), else None.

        Raises:
            EventTooLarge: the last event is larger than `max_event_bytes`.
        """
        if len(self._pending) > self._max:
            raise EventTooLarge(f"an event larger than {self._max} bytes")
        rest, self._pending = bytes(self._pending), bytearray()
        return rest if rest.strip(b"\r\n") else None

    def parse(self, raw: bytes) -> SseEvent | None:
        """The fields of one event as `feed` or `end` returned it; None if it dispatches nothing
        (comments, fields without data, blank lines). Updates `last_event_id`."""
        if self._first:
            self._first = False
            raw = raw.removeprefix(_BOM)
        data: list[bytes] = []
        kind = b""
        retry: int | None = None
        for line in raw.splitlines():  # bytes split on LF, CRLF and CR only
            if not line:
                if data:
                    break
                kind = b""  # a blank line with no data before it dispatches nothing
                continue
            name, colon, value = line.partition(b":")
            if not name and colon:
                continue  # a comment
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
            elif name == b"id" and b"\0" not in value:
                self.last_event_id = value.decode(errors="replace")
            elif name == b"retry" and value.isdigit():  # ASCII digits only, as bytes
                retry = int(value)
            # any other field is ignored, as the rules say
        if not data:
            return None
        return SseEvent(
            b"\n".join(data),
            kind.decode(errors="replace") if kind else "message",
            self.last_event_id,
            retry,
        )


def parse_events(body: bytes) -> list[SseEvent]:
    """Every event of a whole `text/event-stream` body (already read, so already bounded)."""
    splitter = SseSplitter(max(len(body), 1))
    raws = splitter.feed(body)
    last = splitter.end()
    if last is not None:
        raws.append(last)
    return [event for raw in raws if (event := splitter.parse(raw)) is not None]


async def read_events(
    chunks: AsyncIterable[bytes],
    *,
    max_event_bytes: int,
    too_large: Callable[[], Exception] | None = None,
) -> AsyncGenerator[SseEvent, None]:
    """The events of a stream as they arrive.

    Args:
        chunks: the body's bytes as the HTTP client delivers them.
        too_large: the error to raise for an event over the cap, in the caller's protocol
            (default: `EventTooLarge`).

    Raises:
        whatever `chunks` raises (a broken or stalled stream), and the `too_large` error.
    """
    splitter = SseSplitter(max_event_bytes)
    try:
        async for chunk in chunks:
            for raw in splitter.feed(chunk):
                event = splitter.parse(raw)
                if event is not None:
                    yield event
        last = splitter.end()
    except EventTooLarge as exc:
        if too_large is None:
            raise
        raise too_large() from exc
    if last is not None and (event := splitter.parse(last)) is not None:
        yield event


def encode_event(data: bytes, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event as the gateway sends it: `data: ` lines (one per line of `data`), then a blank line.

    `event` and `id` must be single lines (they are the gateway's own words, never a caller's).
    """
    if b"\n" in data or b"\r" in data:
        body = b"".join(b"data: " + line + b"\n" for line in _LINE_END.split(data))
    else:
        body = b"data: " + data + b"\n"
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    return head + body + b"\n"
