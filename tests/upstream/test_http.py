"""The shared upstream HTTP client against a scripted upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentgw.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from agentgw.upstream.http import AnswerTooLarge, HttpClient
from tests.support.servers import Answer, LocalServer, Scripted, unused_url

WHO = "upstream 'u'"


class Upstream:
    def __init__(self, url: str, scripted: Scripted, http: HttpClient) -> None:
        self.url, self.scripted, self.http = url, scripted, http

    def answer(self, answer: Answer) -> None:
        self.scripted.answer = lambda _: answer


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = LocalServer()
    scripted = Scripted(lambda _: Answer(200, [b"ok"]))
    http = HttpClient()
    async with server.serve(scripted):
        try:
            yield Upstream(server.url, scripted, http)
        finally:
            await http.aclose()


async def test_a_request_travels_as_sent_and_a_read_answer_keeps_its_connection(upstream: Upstream) -> None:
    upstream.answer(Answer(201, [b"hel", b"lo"], {"X-Thing": "1"}))
    for _ in range(2):
        response = await upstream.http.send(
            "POST", f"{upstream.url}/p?q=1", {"x-in": "a"}, b"body", timeout_s=5, who=WHO
        )
        assert (response.status_code, response.headers["x-thing"]) == (201, "1")
        assert await response.aread() == b"hello"
        await response.aclose()
    first, second = upstream.scripted.received
    assert (first.method, first.path, first.headers["x-in"], first.content) == ("POST", "/p", "a", b"body")
    assert first.headers["accept-encoding"] == "identity", "near upstreams are asked not to compress"
    assert first.client_port == second.client_port, "the connection was kept alive"


@pytest.mark.parametrize("length", [True, False])
async def test_a_capped_read_refuses_a_larger_body(upstream: Upstream, length: bool) -> None:
    headers = {"content-length": "11"} if length else {}
    upstream.answer(Answer(200, [b"hello", b" world"], headers))
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
    try:
        with pytest.raises(AnswerTooLarge, match="upstream 'u' answered more than 10 bytes"):
            await response.aread(10)
    finally:
        await response.aclose()
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
    assert await response.aread(11) == b"hello world"
    await response.aclose()


async def test_a_body_broken_off_is_an_upstream_error_whether_read_or_streamed(upstream: Upstream) -> None:
    upstream.answer(Answer(200, [b"part"], {}, "drop"))
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
    with pytest.raises(UpstreamError, match="upstream 'u' broke off its answer"):
        await response.aread()
    await response.aclose()
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
    received = []
    with pytest.raises(UpstreamError, match="upstream 'u' broke off the stream"):
        async for chunk in response.aiter_raw():
            received.append(chunk)
    await response.aclose()
    assert b"".join(received) == b"part"


async def test_silence_is_a_timeout_before_the_answer_and_in_its_body(upstream: Upstream) -> None:
    upstream.answer(Answer(end="mute"))
    with pytest.raises(UpstreamTimeout, match=r"upstream 'u' did not answer within 0\.2s"):
        await upstream.http.send("GET", upstream.url, {}, None, timeout_s=0.2, who=WHO)
    upstream.answer(Answer(200, [b"part"], {}, "hang"))
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=0.2, who=WHO)
    with pytest.raises(UpstreamTimeout, match="upstream 'u' stalled its answer"):
        await response.aread()
    await response.aclose()


async def test_a_stream_without_a_read_timeout_may_stay_silent_and_closing_it_reaches_the_upstream(
    upstream: Upstream,
) -> None:
    answer = Answer(200, [b"first"], {}, "hang")
    upstream.answer(answer)
    response = await upstream.http.send(
        "GET", upstream.url, {}, None, timeout_s=0.1, who=WHO, read_timeout=False
    )
    chunks = response.aiter_raw()
    assert await anext(chunks) == b"first"
    with pytest.raises(TimeoutError):  # ours, well past the client's 0.1 s: the client did not give up
        await asyncio.wait_for(anext(chunks), 0.5)
    assert not answer.closed.is_set()
    await response.aclose()
    async with asyncio.timeout(5):
        await answer.closed.wait()


async def test_an_unreachable_upstream_is_an_upstream_error() -> None:
    http = HttpClient()
    try:
        with pytest.raises(UpstreamError, match="upstream 'u' is unreachable") as info:
            await http.send("GET", unused_url(), {}, None, timeout_s=5, who=WHO)
        assert not isinstance(info.value, UpstreamTimeout)
        assert isinstance(info.value, UpstreamUnreachable) and not info.value.maybe_sent
    finally:
        await http.aclose()


async def test_a_request_that_may_have_reached_the_upstream_says_so(upstream: Upstream) -> None:
    # Budgets charge what may have been sent: a timeout after sending or a break is such a failure.
    upstream.answer(Answer(end="mute"))
    with pytest.raises(UpstreamTimeout) as timed_out:
        await upstream.http.send("POST", upstream.url, {}, b"work", timeout_s=0.2, who=WHO)
    assert timed_out.value.maybe_sent and upstream.scripted.received[-1].content == b"work"
    upstream.answer(Answer(end="drop"))
    with pytest.raises(UpstreamError) as broken:
        response = await upstream.http.send("POST", upstream.url, {}, b"more", timeout_s=5, who=WHO)
        await response.aread()
    assert broken.value.maybe_sent and not isinstance(broken.value, UpstreamUnreachable)


async def test_a_closed_client_makes_a_new_pool_on_next_use(upstream: Upstream) -> None:
    await upstream.http.aclose()
    response = await upstream.http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
    assert await response.aread() == b"ok"
    await response.aclose()
