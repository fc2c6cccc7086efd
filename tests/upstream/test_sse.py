"""The one SSE reader and writer, on the edges where the hand-written parsers disagreed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agentgw.upstream.sse import (
    EventTooLarge,
    SseEvent,
    SseSplitter,
    encode_event,
    parse_events,
    read_events,
)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read(*parts: bytes, cap: int = 1 << 20) -> list[SseEvent]:
    return [event async for event in read_events(_chunks(*parts), max_event_bytes=cap)]


def _every_split(stream: bytes) -> list[list[bytes]]:
    # The stream cut in two at every byte, and one byte at a time.
    cuts = [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    return [*cuts, [stream[i : i + 1] for i in range(len(stream))]]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
async def test_every_line_end_ends_lines_and_events(end: bytes) -> None:
    stream = end.join([b"event: ping", b"data: 1", b"", b"data: 2", b"", b""])
    for parts in _every_split(stream):
        assert await _read(*parts) == [SseEvent(b"1", "ping"), SseEvent(b"2")], parts


async def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # `\r` at a chunk's end, `\n` at the next one's start: one line end, not a blank line.
    events = await _read(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [SseEvent(b"a\nb")]


async def test_cr_only_stream_split_after_each_cr() -> None:
    events = await _read(b"data: a\r", b"\r", b"data: b\r", b"\r")
    assert [e.data for e in events] == [b"a", b"b"]


async def test_mixed_line_ends_make_one_blank_line() -> None:
    assert [e.data for e in await _read(b"data: a\n\r\ndata: b\r\n\ndata: c\r\r\n")] == [b"a", b"b", b"c"]


async def test_only_one_space_after_the_colon_is_removed() -> None:
    events = await _read(b"data:x\n\ndata: x\n\ndata:  x\n\n")
    assert [e.data for e in events] == [b"x", b"x", b" x"]


async def test_multi_line_data_joins_with_lf() -> None:
    events = await _read(b'data: {"a":\ndata:1}\ndata\n\n')
    assert events == [SseEvent(b'{"a":\n1}\n')]


async def test_comments_and_unknown_fields_dispatch_nothing() -> None:
    events = await _read(b": keep-alive\n\n:\n\nfoo: bar\n\ndata: x\n: inside\n\n")
    assert events == [SseEvent(b"x")]


async def test_fields_event_id_retry() -> None:
    splitter = SseSplitter(1024)
    raws = splitter.feed(
        b"id: 7\nretry: 1500\nevent: update\ndata: a\n\ndata: b\n\nretry: x1\nid: 8\0\ndata: c\n\n"
    )
    events = [splitter.parse(raw) for raw in raws]
    assert events == [
        SseEvent(b"a", "update", "7", 1500),
        SseEvent(b"b", "message", "7", None),  # the id persists; retry and type do not
        SseEvent(b"c", "message", "7", None),  # an id with NUL and a retry not all digits are ignored
    ]


async def test_an_id_without_data_still_sets_the_last_event_id() -> None:
    splitter = SseSplitter(1024)
    raws = splitter.feed(b"id: 42\n\n")
    assert [splitter.parse(raw) for raw in raws] == [None]
    assert splitter.last_event_id == "42"


async def test_a_leading_bom_is_ignored_once() -> None:
    assert await _read(b"\xef\xbb\xbfdata: a\n\n") == [SseEvent(b"a")]


async def test_the_last_event_without_its_blank_line_ends_with_the_stream() -> None:
    assert [e.data for e in await _read(b"data: a\n\ndata: [DONE]")] == [b"a", b"[DONE]"]
    assert [e.data for e in await _read(b"data: a\n\n\n")] == [b"a"]


async def test_raw_events_are_the_stream_exactly() -> None:
    stream = b": hi\r\n\r\nevent: x\rdata: 1\r\rdata: 2\n\ndata: tail"
    for parts in _every_split(stream):
        splitter = SseSplitter(1024)
        raws = [raw for part in parts for raw in splitter.feed(part)]
        last = splitter.end()
        assert b"".join(raws) + (last or b"") == stream
        assert [e.data for raw in [*raws, last or b""] if (e := splitter.parse(raw))] == [b"1", b"2", b"tail"]


async def test_an_oversize_event_is_refused_finished_or_not() -> None:
    with pytest.raises(EventTooLarge):
        await _read(b"data: " + b"x" * 100, cap=64)  # still unfinished
    with pytest.raises(EventTooLarge):
        await _read(b"data: " + b"x" * 100 + b"\n\n", cap=64)  # whole, in one chunk
    assert [e.data for e in await _read(b"data: " + b"x" * 50 + b"\n\n", cap=64)] == [b"x" * 50]


async def test_an_oversize_event_raises_the_callers_error() -> None:
    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        async for _ in read_events(_chunks(b"data: " + b"x" * 100), max_event_bytes=8, too_large=Mine):
            pass


def test_parse_events_reads_a_whole_body() -> None:
    assert [e.data for e in parse_events(b"data: 1\r\n\r\n: c\n\ndata: 2")] == [b"1", b"2"]


def test_the_writer_and_the_reader_agree() -> None:
    written = encode_event(b"line one\nline two\r\n", event="error", id="9") + encode_event(b'{"a":1}')
    assert written.endswith(b'data: {"a":1}\n\n')
    assert parse_events(written) == [
        SseEvent(b"line one\nline two\n", "error", "9"),
        SseEvent(b'{"a":1}', "message", "9"),
    ]


def test_events_before_an_oversize_one_come_out_first() -> None:
    splitter = SseSplitter(16)
    assert splitter.feed(b"data: a\n\ndata: " + b"x" * 20 + b"\n\n") == [b"data: a\n\n"]
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: b\n\n")
    with pytest.raises(EventTooLarge):
        splitter.end()


async def test_a_stream_that_turns_to_cr_midway_is_still_cut_right() -> None:
    stream = b"data: a\n\ndata: b\n\ndata: c\r\rdata: d\n\r\ndata: e\r\n\n"
    for parts in _every_split(stream):
        assert [e.data for e in await _read(*parts)] == [b"a", b"b", b"c", b"d", b"e"], parts
