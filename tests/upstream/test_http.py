"""The shared upstream HTTP client against a scripted upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentgw.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from agentgw.registry.models import UpstreamLimits
from agentgw.upstream.http import DEFAULT_LIMITS, AnswerTooLarge, HttpClient
from tests.support.servers import Answer, LocalServer, Received, Scripted, unused_url

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


def limited(**fields: float) -> HttpClient:
    return HttpClient(limits=DEFAULT_LIMITS.over(UpstreamLimits.model_validate(fields)))


def streams_and_calls(request: Received) -> Answer:
    if request.path == "/stream":
        return Answer(200, [b"data: 1\n\n"], {"content-type": "text/event-stream"}, "hang")
    return Answer(200, [b"ok"])


async def test_a_call_beyond_the_upstreams_connections_is_refused_as_busy_and_never_sent(
    upstream: Upstream,
) -> None:
    upstream.answer(Answer(200, [b"x"], {}, "hang"))
    http = limited(max_connections=2, connect_wait_s=0.2)
    try:
        held = [await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO) for _ in range(2)]
        with pytest.raises(
            UpstreamBusy, match="upstream 'u' is busy: its 2 connections are all in use"
        ) as info:
            await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        assert (info.value.http_status, info.value.headers["retry-after"]) == (503, "1")
        assert len(upstream.scripted.received) == 2, "the refused call never reached the upstream"
        await held[0].aclose()
        held[0] = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        assert len(upstream.scripted.received) == 3, "a closed answer gives its place back"
        for response in held:
            await response.aclose()
    finally:
        await http.aclose()


async def test_open_streams_leave_calls_their_connections_and_each_upstream_has_its_own_lanes(
    upstream: Upstream,
) -> None:
    upstream.scripted.answer = streams_and_calls
    http = limited(max_connections=1, max_streams=2, connect_wait_s=0.2)
    url = upstream.url
    try:
        streams = [await http.send("GET", f"{url}/stream", {}, None, timeout_s=5, who=WHO, stream=True)]
        streams.append(await http.send("GET", f"{url}/stream", {}, None, timeout_s=5, who=WHO, stream=True))
        with pytest.raises(UpstreamBusy, match="upstream 'u' is busy: its 2 streams are all open"):
            await http.send("GET", f"{url}/stream", {}, None, timeout_s=5, who=WHO, stream=True)
        for _ in range(3):  # one connection for calls, free every time
            call = await http.send("GET", f"{url}/call", {}, None, timeout_s=5, who=WHO)
            assert await call.aread() == b"ok"
            await call.aclose()
        # An answer that turns out to be a stream moves to the streams lane, or is refused if it is full.
        late = await http.send("GET", f"{url}/stream", {}, None, timeout_s=5, who=WHO)
        with pytest.raises(UpstreamBusy, match="its 2 streams are all open"):
            await late.as_stream()
        await streams.pop().aclose()
        await late.as_stream()
        streams.append(late)
        call = await http.send("GET", f"{url}/call", {}, None, timeout_s=5, who=WHO)
        assert await call.aread() == b"ok", "the moved stream gave its call's place back"
        await call.aclose()
        # Another upstream, and one with its own higher limit, are not held back by this one's streams.
        other = await http.send(
            "GET", f"{url}/stream", {}, None, timeout_s=5, who="upstream 'v'", stream=True
        )
        more = UpstreamLimits(max_streams=3)
        third = await http.send(
            "GET", f"{url}/stream", {}, None, timeout_s=5, who=WHO, stream=True, limits=more
        )
        for response in (*streams, other, third):
            await response.aclose()
    finally:
        await http.aclose()


async def test_an_answer_read_whole_is_capped_at_the_upstreams_max_answer_bytes(upstream: Upstream) -> None:
    http = limited(max_answer_bytes=1024)
    try:
        for headers in ({"content-length": "2048"}, {}):
            upstream.answer(Answer(200, [b"x" * 1024, b"y" * 1024], headers))
            response = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
            assert response.max_answer_bytes == 1024
            with pytest.raises(AnswerTooLarge, match="upstream 'u' answered more than 1024 bytes"):
                await response.aread()
            await response.aclose()
        upstream.answer(Answer(200, [b"x" * 1024]))
        response = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        assert len(await response.aread()) == 1024
        await response.aclose()
    finally:
        await http.aclose()


async def test_the_last_state_of_each_upstream_is_kept_without_probing(upstream: Upstream) -> None:
    http = HttpClient()
    try:
        upstream.answer(Answer(500, [b"oops"]))
        response = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        await response.aclose()
        with pytest.raises(UpstreamError):
            await http.send("GET", unused_url(), {}, None, timeout_s=5, who="upstream 'down'")
        states = http.states()
        assert (states[WHO].ok, states[WHO].detail) == (False, "answered HTTP 500")
        assert (states["upstream 'down'"].ok, states["upstream 'down'"].detail) == (False, "unreachable")
        upstream.answer(Answer(200, [b"ok"]))
        response = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        await response.aclose()
        assert http.states()[WHO].ok
    finally:
        await http.aclose()


async def test_an_answer_that_breaks_off_while_read_gives_its_place_back(upstream: Upstream) -> None:
    # The caller lets the error pass without closing the answer: the next call still finds a place.
    http = limited(max_connections=1, connect_wait_s=0.2)
    try:
        upstream.answer(Answer(end="drop"))
        response = await http.send("POST", upstream.url, {}, b"x", timeout_s=5, who=WHO)
        with pytest.raises(UpstreamError):
            await response.aread()
        upstream.answer(Answer(200, [b"ok"]))
        again = await http.send("GET", upstream.url, {}, None, timeout_s=5, who=WHO)
        assert await again.aread() == b"ok"
    finally:
        await http.aclose()
