"""The OpenAI-compatible provider against a scripted provider on 127.0.0.1 (real HTTP, real breaks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from agentgw.errors import UpstreamBusy, UpstreamError, UpstreamTimeout
from agentgw.registry.llm import LlmRoute, LlmRouteSpec
from agentgw.upstream import llm as llm_module
from agentgw.upstream.llm import LlmAnswer, OpenAICompatible
from tests.support.servers import Answer, LocalServer, Received, Scripted, unused_url

Handler = Callable[[Received], Answer]
SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}


class Provider:
    """The provider under test, and the scripted upstream it talks to."""

    def __init__(self, server: LocalServer, upstream: Scripted, llm: OpenAICompatible) -> None:
        self.url = server.url
        self.upstream = upstream
        self.llm = llm

    def script(self, handler: Handler) -> OpenAICompatible:
        self.upstream.answer = handler
        return self.llm

    def route(self, **extra: Any) -> LlmRoute:
        spec = LlmRouteSpec.model_validate(
            {"name": "fast", "base_url": f"{self.url}/v1", "model": "m-1", "timeout_s": 1} | extra
        )
        return LlmRoute(spec)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    server = LocalServer()
    upstream = Scripted(lambda _: Answer(500))
    llm = OpenAICompatible()
    async with server.serve(upstream):
        try:
            yield Provider(server, upstream, llm)
        finally:
            await llm.aclose()


def sse(*events: bytes, end: Any = "end") -> Answer:
    return Answer(200, list(events), SSE, end)


async def collect(answer: LlmAnswer) -> list[dict[str, Any]]:
    assert answer.events is not None
    try:
        return [event async for event in answer.events]
    finally:
        await answer.close()


async def test_the_request_names_the_provider_model_asks_for_stream_usage_and_carries_the_route_key(
    provider: Provider,
) -> None:
    llm = provider.script(lambda _: sse(b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"))
    body = {"model": "fast", "messages": [], "stream": True, "stream_options": {"x": 1}}
    route = provider.route(credential={"mode": "static", "secret": "k"})
    answer = await llm.send(route, "chat/completions", body, stream=True, authorization="Bearer sk-route")
    assert await collect(answer) == [{"choices": []}]
    [request] = provider.upstream.received
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    sent = orjson.loads(request.content)
    assert sent["model"] == "m-1" and sent["stream_options"] == {"x": 1, "include_usage": True}
    assert request.headers["authorization"] == "Bearer sk-route"
    assert request.headers["accept"] == "text/event-stream"
    assert body["model"] == "fast", "the caller's body is not modified"


async def test_events_split_across_chunks_and_line_ends_of_every_kind_are_reassembled(
    provider: Provider,
) -> None:
    chunks = [
        b'data: {"a"',
        b": 1}\r",
        b"\n\r\n",
        b'data: {"b": 2}\r\rdata: {"c":',
        b" 3}\n\n",
        b"data: [DONE]\n\n",
    ]
    llm = provider.script(lambda _: sse(*chunks))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    assert await collect(answer) == [{"a": 1}, {"b": 2}, {"c": 3}]


async def test_a_last_done_without_its_blank_line_still_ends_the_stream_cleanly(provider: Provider) -> None:
    llm = provider.script(lambda _: sse(b'data: {"a": 1}\n\ndata: [DONE]'))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    assert await collect(answer) == [{"a": 1}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'data: {"a": 1}\n\n', "ended the stream early"),
        (b"data: not json\n\n", "not JSON"),
    ],
)
async def test_a_stream_that_ends_early_or_carries_garbage_is_an_upstream_error(
    provider: Provider, content: bytes, match: str
) -> None:
    llm = provider.script(lambda _: sse(content))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    with pytest.raises(UpstreamError, match=match):
        await collect(answer)


async def test_a_stream_the_provider_breaks_off_is_an_upstream_error(provider: Provider) -> None:
    script = sse(b'data: {"a": 1}\n\n', end="drop")
    llm = provider.script(lambda _: script)
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    with pytest.raises(UpstreamError, match="model 'fast': the provider broke off the stream"):
        await collect(answer)


async def test_a_stalled_stream_is_a_timeout_and_closing_it_frees_the_provider(provider: Provider) -> None:
    script = sse(b'data: {"a": 1}\n\n', end="hang")
    llm = provider.script(lambda _: script)
    answer = await llm.send(provider.route(timeout_s=0.2), "chat/completions", {}, stream=True)
    with pytest.raises(UpstreamTimeout, match="stalled mid-stream"):
        await collect(answer)
    async with asyncio.timeout(5):
        await script.closed.wait()


async def test_an_abandoned_stream_is_closed_on_the_providers_side(provider: Provider) -> None:
    script = sse(b'data: {"a": 1}\n\n', end="hang")
    llm = provider.script(lambda _: script)
    answer = await llm.send(provider.route(timeout_s=60), "chat/completions", {}, stream=True)
    assert answer.events is not None
    assert await anext(answer.events) == {"a": 1}
    await answer.close()
    async with asyncio.timeout(5):
        await script.closed.wait()


async def test_a_stream_event_beyond_the_cap_is_refused_rather_than_buffered(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm_module, "MAX_EVENT_BYTES", 16)
    llm = provider.script(lambda _: sse(b'data: {"a": "', b"x" * 10, b"x" * 10, end="hang"))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    with pytest.raises(UpstreamError, match="an event larger than the gateway accepts"):
        await collect(answer)


@pytest.mark.parametrize("status", [500, 503, 401, 403, 404])
async def test_5xx_and_refusals_of_the_gateways_own_credential_are_upstream_errors(
    provider: Provider, status: int
) -> None:
    llm = provider.script(lambda _: Answer(status, [b'{"error": {"message": "no"}}'], JSON))
    with pytest.raises(UpstreamError, match=f"HTTP {status}"):
        await llm.send(provider.route(), "chat/completions", {}, stream=False)


async def test_a_refusal_of_the_request_comes_back_for_the_client_with_retry_after(
    provider: Provider,
) -> None:
    llm = provider.script(lambda _: Answer(429, [b"slow down"], {"retry-after": "7"}))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=True)
    assert answer.status == 429 and answer.events is None
    assert answer.headers == {"retry-after": "7"}
    assert answer.body == {"error": {"message": "the provider refused the request (HTTP 429)"}}


async def test_a_provider_error_object_is_relayed_as_it_is(provider: Provider) -> None:
    error = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    llm = provider.script(lambda _: Answer(400, [orjson.dumps(error)], JSON))
    answer = await llm.send(provider.route(), "chat/completions", {}, stream=False)
    assert (answer.status, answer.body) == (400, error)


async def test_timeouts_and_unreachable_providers_are_mapped(provider: Provider) -> None:
    llm = provider.script(lambda _: Answer(end="mute"))
    with pytest.raises(UpstreamTimeout, match=r"model 'fast': the provider did not answer within 0\.2s"):
        await llm.send(provider.route(timeout_s=0.2), "embeddings", {}, stream=False)
    with pytest.raises(UpstreamError, match="model 'fast': the provider is unreachable"):
        await llm.send(provider.route(base_url=unused_url()), "embeddings", {}, stream=False)


async def test_an_answer_broken_off_midway_is_an_upstream_error(provider: Provider) -> None:
    headers = {**JSON, "content-length": "100"}
    llm = provider.script(lambda _: Answer(200, [b'{"ok": '], headers, "drop"))
    with pytest.raises(UpstreamError, match="broke off its answer"):
        await llm.send(provider.route(), "embeddings", {}, stream=False)


@pytest.mark.parametrize("authorization", ["Bearer from-the-stage", None])
async def test_the_provider_sends_the_header_it_is_given_and_fetches_no_token_of_its_own(
    provider: Provider, authorization: str | None
) -> None:
    # A route with a client-credentials grant: its token is the credentials stage's to obtain.
    credential = {
        "mode": "client_credentials",
        "token_url": f"{provider.url}/token",
        "client_id": "gw",
        "secret": "k",
    }
    llm = provider.script(lambda _: Answer(200, [b'{"ok": true}'], JSON))
    for _ in range(2):
        answer = await llm.send(
            provider.route(credential=credential), "embeddings", {}, stream=False, authorization=authorization
        )
        assert answer.body == {"ok": True}
    assert [r.path for r in provider.upstream.received] == ["/v1/embeddings", "/v1/embeddings"]
    assert [r.headers.get("authorization") for r in provider.upstream.received] == [authorization] * 2


async def test_an_answer_over_the_routes_cap_is_an_upstream_error_and_streams_leave_calls_a_connection(
    provider: Provider,
) -> None:
    big = orjson.dumps({"choices": [{"message": {"content": "x" * 5000}}]})
    llm = provider.script(
        lambda request: (
            sse(b'data: {"choices": []}\n\n', end="hang")
            if request.headers["accept"] == "text/event-stream"
            else Answer(200, [big], JSON)
        )
    )
    route = provider.route(
        limits={"max_answer_bytes": 4096, "max_streams": 1, "connect_wait_s": 0.1}, timeout_s=5
    )
    with pytest.raises(UpstreamError, match="model 'fast': the provider answered more than 4096 bytes"):
        await llm.send(route, "chat/completions", {"messages": []}, stream=False)
    held = await llm.send(route, "chat/completions", {"messages": []}, stream=True)
    with pytest.raises(UpstreamBusy, match="model 'fast': the provider is busy: its 1 streams are all open"):
        await llm.send(route, "chat/completions", {"messages": []}, stream=True)
    with pytest.raises(UpstreamError, match="more than 4096 bytes"):  # a call still reaches the provider
        await llm.send(route, "chat/completions", {"messages": []}, stream=False)
    await held.close()
