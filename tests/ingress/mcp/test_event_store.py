"""The bridge's stream events: bounded per stream, in all and in time, and never another session's."""

from __future__ import annotations

from unittest import mock

from mcp.server.streamable_http import EventMessage
from mcp_types import JSONRPCNotification

from agentgw.ingress.mcp.event_store import SessionEvents


def note(n: int) -> JSONRPCNotification:
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/message", params={"n": n})


async def replayed(events: SessionEvents, session: str, after: str) -> tuple[str | None, list[int]]:
    got: list[EventMessage] = []

    async def send(event: EventMessage) -> None:
        got.append(event)

    stream = await events.for_session(session).replay_events_after(after, send)
    return stream, [event.message.params["n"] for event in got]  # type: ignore[union-attr]  # notifications only


async def test_a_stream_replays_what_followed_the_clients_last_event_and_nothing_of_other_streams() -> None:
    events = SessionEvents()
    store = events.for_session("s1")
    primed = await store.store_event("7", None)
    await store.store_event("7", note(1))
    await store.store_event("8", note(99))
    await store.store_event("7", note(2))
    assert await replayed(events, "s1", primed) == ("7", [1, 2])


async def test_another_sessions_event_id_replays_nothing() -> None:
    events = SessionEvents()
    primed = await events.for_session("owner").store_event("1", None)
    await events.for_session("owner").store_event("1", note(1))
    await events.for_session("other").store_event("1", note(2))
    assert await replayed(events, "other", primed) == (None, [])
    assert await replayed(events, "owner", "no-such-id") == (None, [])


async def test_events_are_capped_per_stream_and_in_all() -> None:
    events = SessionEvents(per_stream=3, in_all=4)
    store = events.for_session("s")
    ids = [await store.store_event("a", note(n)) for n in range(4)]
    assert await replayed(events, "s", ids[0]) == (None, [])  # pushed out of its stream
    assert await replayed(events, "s", ids[1]) == ("a", [2, 3])
    for n in range(3):
        await events.for_session("t").store_event("b", note(n))
    assert len(events) == 4
    assert await replayed(events, "s", ids[2]) == (None, [])  # the oldest of all went first


async def test_events_expire_and_end_with_their_session() -> None:
    events = SessionEvents(ttl_s=60)
    with mock.patch("agentgw.ingress.mcp.event_store.time.monotonic", return_value=1000.0):
        old = await events.for_session("s").store_event("a", None)
        await events.for_session("s").store_event("a", note(1))
    with mock.patch("agentgw.ingress.mcp.event_store.time.monotonic", return_value=1061.0):
        assert await replayed(events, "s", old) == (None, [])
        kept = await events.for_session("s").store_event("a", None)
    events.drop("s")
    assert await replayed(events, "s", kept) == (None, [])
    assert len(events) == 0


async def test_large_events_are_capped_by_their_bytes_in_all_oldest_first() -> None:
    size = len(note(0).model_dump_json(by_alias=True, exclude_none=True))
    events = SessionEvents(bytes_in_all=3 * size)
    store = events.for_session("s")
    ids = [await store.store_event("a", note(n)) for n in range(5)]
    assert len(events) == 3 and events.bytes == 3 * size
    assert await replayed(events, "s", ids[1]) == (None, [])  # pushed out by the bytes that came after
    assert await replayed(events, "s", ids[2]) == ("a", [3, 4])
    events.drop("s")
    assert len(events) == 0 and events.bytes == 0
