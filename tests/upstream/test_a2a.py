"""The A2A upstream against a scripted agent on 127.0.0.1: the headers a request carries, and the SSE
reader that splits the agent's stream into events as they arrive."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agentgw.errors import UpstreamError
from agentgw.upstream.a2a import A2aHttpUpstream, AgentEvent, EventTooLarge, read_agent_events
from tests.support.servers import Answer, LocalServer, Scripted


class Agent:
    def __init__(self, url: str, scripted: Scripted, upstream: A2aHttpUpstream) -> None:
        self.url, self.scripted, self.upstream = url, scripted, upstream

    async def events(self, answer: Answer, max_event_bytes: int = 1024) -> list[AgentEvent]:
        self.scripted.answer = lambda _: answer
        response = await self.upstream.send(
            "POST", self.url, {}, b"{}", credential=None, timeout_s=5, stream=True, agent="a"
        )
        try:
            return [event async for event in read_agent_events(response, max_event_bytes)]
        finally:
            await response.aclose()


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    server = LocalServer()
    scripted = Scripted(lambda _: Answer(200, [b"{}"], {"content-type": "application/json"}))
    upstream = A2aHttpUpstream()
    async with server.serve(scripted):
        try:
            yield Agent(server.url, scripted, upstream)
        finally:
            await upstream.aclose()


async def test_a_request_carries_the_callers_a2a_headers_and_only_the_credential_it_is_given(
    agent: Agent,
) -> None:
    incoming = {"a2a-version": "1.0", "authorization": "Bearer the-callers-token", "cookie": "c=1"}
    for credential, stream in ((("x-api-key", "k"), False), (None, True)):
        response = await agent.upstream.send(
            "POST", agent.url, incoming, b"{}", credential=credential, timeout_s=5, stream=stream, agent="a"
        )
        await response.aclose()
    keyed, plain = (r.headers for r in agent.scripted.received)
    assert (keyed["a2a-version"], keyed["x-api-key"], keyed["accept"]) == ("1.0", "k", "application/json")
    assert keyed["content-type"] == "application/json"
    assert plain["accept"] == "text/event-stream, application/json"
    for headers in (keyed, plain):
        assert "authorization" not in headers and "cookie" not in headers


async def test_events_are_split_at_blank_lines_whatever_the_line_ends_and_the_chunks(agent: Agent) -> None:
    stream = b'event: status\ndata: {"a":\ndata: 1}\n\n: a comment\ndata:2\r\n\r\n\n\ndata: 3\r\rdata: lost'
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    events = await agent.events(Answer(200, chunks, {"content-type": "text/event-stream"}))
    assert [(e.name, e.data) for e in events] == [
        ("status", b'{"a":\n1}'),
        ("message", b"2"),
        ("message", b"3"),
    ]
    assert events[0].raw == b'event: status\ndata: {"a":\ndata: 1}', "relayed as the agent wrote it"
    assert events[1].raw == b": a comment\ndata:2"


async def test_an_event_larger_than_the_cap_is_refused_and_a_broken_stream_is_an_upstream_error(
    agent: Agent,
) -> None:
    with pytest.raises(EventTooLarge):
        await agent.events(Answer(200, [b"data: " + b"x" * 100, b"x" * 100]), max_event_bytes=150)
    with pytest.raises(UpstreamError) as info:
        await agent.events(Answer(200, [b"data: 1\n\n", b"data: 2"], end="drop"))
    assert not isinstance(info.value, EventTooLarge)
