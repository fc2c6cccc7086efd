"""The OpenAI-compatible provider against scripted HTTP answers (httpx.MockTransport)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from agentgw.errors import CredentialError, UpstreamError, UpstreamTimeout
from agentgw.upstream.llm import LlmAnswer, OpenAICompatible
from registry.llm import LlmRoute, LlmRouteSpec, Secret

Handler = Callable[[httpx.Request], httpx.Response]


def route(**extra: Any) -> LlmRoute:
    spec = LlmRouteSpec.model_validate(
        {"name": "fast", "base_url": "http://provider/v1", "model": "m-1", "timeout_s": 1} | extra
    )
    return LlmRoute(spec, Secret("sk-route") if "credential" in extra else None)


def provider(handler: Handler) -> OpenAICompatible:
    return OpenAICompatible(httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def sse(*events: bytes) -> httpx.Response:
    return httpx.Response(200, content=b"".join(events), headers={"content-type": "text/event-stream"})


async def collect(answer: LlmAnswer) -> list[dict[str, Any]]:
    assert answer.events is not None
    try:
        return [event async for event in answer.events]
    finally:
        await answer.close()


async def test_the_request_names_the_provider_model_asks_for_stream_usage_and_carries_the_route_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse(b'data: {"choices": []}\n\n', b"data: [DONE]\n\n")

    body = {"model": "fast", "messages": [], "stream": True, "stream_options": {"x": 1}}
    answer = await provider(handler).send(
        route(credential={"mode": "static", "env": "K"}), "chat/completions", body, stream=True
    )
    assert await collect(answer) == [{"choices": []}]
    [request] = seen
    assert str(request.url) == "http://provider/v1/chat/completions"
    sent = orjson.loads(request.content)
    assert sent["model"] == "m-1" and sent["stream_options"] == {"x": 1, "include_usage": True}
    assert request.headers["authorization"] == "Bearer sk-route"
    assert body["model"] == "fast", "the caller's body is not modified"


async def test_a_last_done_without_its_blank_line_still_ends_the_stream_cleanly() -> None:
    answer = await provider(lambda _: sse(b'data: {"a": 1}\n\ndata: [DONE]')).send(
        route(), "chat/completions", {}, stream=True
    )
    assert await collect(answer) == [{"a": 1}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'data: {"a": 1}\n\n', "ended the stream early"),
        (b"data: not json\n\n", "not JSON"),
    ],
)
async def test_a_stream_that_ends_early_or_carries_garbage_is_an_upstream_error(
    content: bytes, match: str
) -> None:
    answer = await provider(lambda _: sse(content)).send(route(), "chat/completions", {}, stream=True)
    with pytest.raises(UpstreamError, match=match):
        await collect(answer)


@pytest.mark.parametrize("status", [500, 503, 401, 403, 404])
async def test_5xx_and_refusals_of_the_gateways_own_credential_are_upstream_errors(status: int) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "no"}})

    with pytest.raises(UpstreamError, match=f"HTTP {status}"):
        await provider(handler).send(route(), "chat/completions", {}, stream=False)


async def test_a_refusal_of_the_request_comes_back_for_the_client_with_retry_after() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(429, text="slow down", headers={"retry-after": "7"})

    answer = await provider(handler).send(route(), "chat/completions", {}, stream=True)
    assert answer.status == 429 and answer.events is None
    assert answer.headers == {"retry-after": "7"}
    assert answer.body == {"error": {"message": "the provider refused the request (HTTP 429)"}}


async def test_timeouts_and_unreachable_providers_are_mapped() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UpstreamTimeout):
        await provider(slow).send(route(), "embeddings", {}, stream=False)
    with pytest.raises(UpstreamError, match="unreachable"):
        await provider(down).send(route(), "embeddings", {}, stream=False)


async def test_a_client_credentials_token_is_fetched_once_and_a_refused_client_is_a_credential_error() -> (
    None
):
    tokens: list[httpx.Request] = []
    refuse = False

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            tokens.append(request)
            if refuse:
                return httpx.Response(401, json={"error": "invalid_client"})
            return httpx.Response(200, json={"access_token": "cc-1", "expires_in": 3600})
        assert request.headers["authorization"] == "Bearer cc-1"
        return httpx.Response(200, json={"ok": True})

    credential = {
        "mode": "client_credentials",
        "token_url": "http://idp/token",
        "client_id": "gw",
        "env": "K",
    }
    llm = provider(handler)
    for _ in range(3):
        answer = await llm.send(route(credential=credential), "embeddings", {}, stream=False)
        assert answer.body == {"ok": True}
    assert len(tokens) == 1
    assert tokens[0].headers["authorization"].startswith("Basic ")
    assert b"grant_type=client_credentials" in tokens[0].content
    refuse = True
    with pytest.raises(CredentialError, match="refused the client"):
        await provider(handler).send(route(credential=credential), "embeddings", {}, stream=False)
