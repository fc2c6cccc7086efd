"""LLM providers: the `LlmProvider` seam and its OpenAI-compatible implementation.

The gateway's LLM ingress speaks OpenAI's wire shapes, so a provider takes and returns OpenAI-shaped
JSON objects; a provider with another API (Anthropic, Bedrock, ...) translates both ways behind the
same protocol, and `LlmRouteSpec.provider` names which one serves a route.

What goes upstream is the client's request with two changes only: `model` becomes the route's
provider model id, and a streamed request asks for usage (`stream_options.include_usage`) so that
budgets settle from the provider's own count. The caller's Authorization never goes upstream: the
provider gets the header the credentials stage set on the call (`Call.upstream_authorization`), the
route's credential, obtained and renewed there as every upstream's is.

The HTTP seam is the MCP pass-through's: `HttpClient.send` for the request and its lanes,
`UpstreamResponse` for the answer, `read_events` (agentgw/upstream/sse.py) for a streamed one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from agentgw.errors import UpstreamError
from agentgw.registry.llm import LlmRoute
from agentgw.upstream.http import HttpClient, UpstreamResponse, UpstreamState
from agentgw.upstream.sse import read_events

__all__ = ["LlmAnswer", "LlmProvider", "OpenAICompatible", "Operation"]

Operation = Literal["chat/completions", "embeddings"]
# Upstream headers a client may see (rate-limit hints help it back off).
RELAYED_HEADERS = ("retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
# Provider statuses that say the route is misconfigured rather than the request bad.
GATEWAY_SIDE_REFUSALS = frozenset({401, 403, 404})
# One SSE event larger than this is not a chat chunk: the stream is refused rather than buffered on.
MAX_EVENT_BYTES = 8 * 1024 * 1024
_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_STREAM_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class LlmAnswer:
    """A provider's answer.

    Attributes:
        status: the provider's HTTP status (2xx, or a 4xx the client should see; 5xx are raised).
        body: the JSON answer, or the OpenAI-shaped error body for a 4xx; `None` while streaming.
        events: for a streamed 200, the chunks as JSON objects; raises `UpstreamError` (cut) or
            `UpstreamTimeout` (stalled) mid-stream, and ends after the provider's `[DONE]`.
        headers: provider headers worth relaying (`Retry-After`, rate-limit hints).
        close: releases the connection; call it once the events are read or abandoned.
    """

    status: int
    body: dict[str, Any] | None = None
    events: AsyncIterator[dict[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    close: Callable[[], Awaitable[None]] = _nothing


class LlmProvider(Protocol):
    """Sends one OpenAI-shaped request for a route.

    `send` raises `UpstreamTimeout` (no answer in time) or `UpstreamError` (unreachable, 5xx, a
    refusal of the gateway's own credential or model id, garbage): the failures a route's fallbacks
    cover. A refusal of the request itself (400, 413, 422, 429, ...) comes back as an `LlmAnswer`
    for the client to see.
    """

    async def send(
        self,
        route: LlmRoute,
        operation: Operation,
        body: Mapping[str, Any],
        *,
        stream: bool,
        authorization: str | None = None,
    ) -> LlmAnswer:
        """`authorization`: the header value the credentials stage set for the route, if any."""
        ...

    async def aclose(self) -> None: ...

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each provider found (for readiness)."""
        ...


class OpenAICompatible:
    """An OpenAI-compatible HTTP API (OpenAI, Azure OpenAI's v1 API, vLLM, Ollama, LiteLLM, ...)."""

    def __init__(self, http: HttpClient | None = None) -> None:
        self._http = http or HttpClient()

    async def aclose(self) -> None:
        await self._http.aclose()

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each provider found."""
        return self._http.states()

    async def send(
        self,
        route: LlmRoute,
        operation: Operation,
        body: Mapping[str, Any],
        *,
        stream: bool,
        authorization: str | None = None,
    ) -> LlmAnswer:
        """Send `body` to the route's `<base_url>/<operation>`, with `authorization` (the credentials
        stage's header for the route) if there is one.

        Raises:
            UpstreamBusy: no connection to the provider free within the route's short wait.
            UpstreamTimeout: no answer within the route's timeout.
            UpstreamError: unreachable, a 5xx, an answer larger than the route's `max_answer_bytes`,
                or one that is not what the API promises.
        """
        spec = route.spec
        payload = {**body, "model": spec.model}
        if stream:
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        headers = _STREAM_HEADERS if stream else _JSON_HEADERS
        if authorization is not None:
            headers = {**headers, "authorization": authorization}
        url = f"{spec.base_url.rstrip('/')}/{operation}"
        response = await self._http.send(
            "POST",
            url,
            headers,
            orjson.dumps(payload),
            timeout_s=spec.timeout_s,
            connect_s=spec.connect_timeout_s,
            who=f"model {route.name!r}: the provider",
            stream=stream,
            limits=spec.limits,
        )
        relayed = {h: response.headers[h] for h in RELAYED_HEADERS if h in response.headers}
        content_type = response.headers.get("content-type", "")
        if response.status_code == 200 and stream and content_type.startswith("text/event-stream"):
            events = _events(response, route.name)

            async def close() -> None:
                await events.aclose()
                await response.aclose()

            return LlmAnswer(200, events=events, headers=relayed, close=close)
        try:
            raw = await response.aread()
        finally:
            await response.aclose()
        status = response.status_code
        if status >= 500:
            raise UpstreamError(f"model {route.name!r}: the provider failed (HTTP {status})")
        if status in GATEWAY_SIDE_REFUSALS:
            # The route's credential or model id is wrong: the gateway's fault, not the caller's, and
            # relaying a 401 would read as "your token is bad" to a client that did nothing wrong.
            raise UpstreamError(f"model {route.name!r}: the provider refused the gateway (HTTP {status})")
        parsed = _json_object(raw)
        if 200 <= status < 300:
            if parsed is None:
                raise UpstreamError(f"model {route.name!r}: the provider answered something that is not JSON")
            return LlmAnswer(status, body=parsed, headers=relayed)
        if parsed is None or not isinstance(parsed.get("error"), dict):
            parsed = {"error": {"message": f"the provider refused the request (HTTP {status})"}}
        return LlmAnswer(status, body=parsed, headers=relayed)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def _events(response: UpstreamResponse, model: str) -> AsyncGenerator[dict[str, Any], None]:
    """The SSE `data:` payloads of `response` as JSON objects, up to `[DONE]`.

    Raises:
        UpstreamTimeout: the provider went silent for longer than the route's timeout.
        UpstreamError: the connection broke, the stream ended without `[DONE]`, an event is larger
            than `MAX_EVENT_BYTES`, or a payload is not JSON.
    """

    def too_large() -> UpstreamError:
        return UpstreamError(
            f"model {model!r}: the provider streamed an event larger than the gateway accepts"
        )

    events = read_events(response.aiter_raw(), max_event_bytes=MAX_EVENT_BYTES, too_large=too_large)
    try:
        async for event in events:
            if event.data.strip() == b"[DONE]":
                return
            chunk = _json_object(event.data)
            if chunk is None:
                raise UpstreamError(f"model {model!r}: the provider streamed something that is not JSON")
            yield chunk
    finally:
        await events.aclose()
    raise UpstreamError(f"model {model!r}: the provider ended the stream early")
