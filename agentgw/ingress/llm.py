"""OpenAI-compatible LLM ingress: `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.

Every request becomes a `Call(protocol="llm")` through the one pipeline: the policy object is
`llm:<virtual model>`, the action `call` (or `list` for discovery, whose `Reply.listing` the policy
stage narrows), the run is the `Agent-Run-Id` header. The budget stage reserves `Call.estimate`
(prompt estimate plus `max_tokens`, or the route's default, at the route's prices) and trues up from
`Reply.usage`: the provider's `usage`, or for a stream the usage chunk the gateway asks the provider
for, or a count of what went by when the provider reports none. A streamed reply comes back from the
pipeline as soon as the provider starts answering (`Reply.streaming`); the relay calls
`Reply.settle` exactly once when the stream ends, however it ends.

The policy is asked before the model is looked up, so a caller learns nothing about models it may
not call: an unknown and a forbidden model both get 403 from a caller without a matching rule; an
allowed but unknown (or disabled) model gets 404 `model_not_found`. In discovery, hidden and unknown
models look exactly alike (absent from the list, 404 from `GET /v1/models/{model}`).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status of the
`GatewayError` (401, 403, 404, 413, 415, 429 with `Retry-After`, 502, 504). A stream that breaks
after it started ends with one such error object as its last `data:` event and no `[DONE]`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from agentgw.call import RUN_ID_HEADER, Call, Reply, Usage, checked_run_id
from agentgw.errors import (
    BadRequest,
    ConfigError,
    GatewayError,
    NotFound,
    ParseError,
    UpstreamError,
)
from agentgw.ingress.body import read_body
from agentgw.ingress.relay import RelayResponse
from agentgw.pipeline import Pipeline
from agentgw.registry.llm import MODEL_NAME_PATTERN, LlmRoute, LlmRouteError, LlmRoutes, LlmRouteSpec
from agentgw.upstream.http import DEFAULT_LIMITS, HttpClient, Limits, UpstreamState
from agentgw.upstream.llm import LlmAnswer, LlmProvider, OpenAICompatible, Operation
from agentgw.upstream.sse import encode_event

__all__ = [
    "ENDPOINT",
    "LlmIngress",
    "error_body",
    "error_response",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

ENDPOINT: Final = "/v1"
# The prompt estimate (a reservation, and the count when a provider reports no usage): ~4 bytes of
# text per token, plus a few tokens of framing per message, as OpenAI's own rule of thumb says.
BYTES_PER_TOKEN: Final = 4
TOKENS_PER_MESSAGE: Final = 4
# Output reserved for a model the gateway does not know (the call fails before it costs anything).
UNKNOWN_MODEL_MAX_TOKENS: Final = 1024
# The listed container of a `/v1/models` call, for audit; the items are `llm:<model>`.
MODELS_RESOURCE: Final = "llm:*"

_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "insufficient_quota",
}


# --- errors in OpenAI's shape ------------------------------------------------------------------------


def error_body(exc: GatewayError) -> dict[str, Any]:
    """`exc` as an OpenAI error object; `param` and `code` come from `exc.data` when it names them."""
    data = exc.data if isinstance(exc.data, dict) else {}
    status = exc.http_status
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = data.get("param")
    code = data.get("code", exc.reason)
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}


def error_response(exc: BaseException) -> Response:
    """The HTTP answer for `exc`; a foreign exception is an internal error (fail closed), logged."""
    if not isinstance(exc, GatewayError):
        log.error("internal error while handling an LLM request", exc_info=exc)
        exc = GatewayError("internal error")
    return Response(
        orjson.dumps(error_body(exc)),
        status_code=exc.http_status,
        headers=exc.headers,
        media_type="application/json",
    )


def _unknown_model(model: str) -> NotFound:
    # OpenAI's own words: a client cannot tell "absent" from "not yours".
    return NotFound(
        f"The model '{model}' does not exist or you do not have access to it.",
        data={"param": "model", "code": "model_not_found"},
    )


def _bad(message: str, param: str | None) -> BadRequest:
    return BadRequest(message, data={"param": param, "code": "invalid_request"})


# --- request reading and estimates (pure) ------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    raw = await read_body(request, limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ParseError("the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    return body


def _model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    return model


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"{name} must be a positive integer", name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean", name)
    return value


def _text_bytes(value: Any) -> int:
    """UTF-8 size of every string value (not key) in a JSON value: what a tokenizer would see."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, int) and not isinstance(value, bool):
        return BYTES_PER_TOKEN  # a token id (embeddings accept arrays of them)
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    return 0


def estimate_tokens(value: Any, *, messages: int = 0) -> int:
    """An estimate of the tokens in a prompt (`messages` adds per-message framing)."""
    return math.ceil(_text_bytes(value) / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * messages


def _estimate(chain: Sequence[LlmRoute], prompt: int, output: int) -> Usage:
    # Reserve at the dearest route that may serve, so a fallback cannot overspend the reservation.
    cost = max((r.cost(prompt, output) for r in chain), default=0.0)
    return Usage(calls=1, tokens=prompt + output, cost=cost)


def _reported(usage: Any) -> tuple[int, int] | None:
    """(input, output) tokens from an OpenAI `usage` object, or None if it reports nothing usable."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        return None
    if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
        completion = total - prompt if isinstance(total, int) and total >= prompt else 0
    return prompt, completion


def _generated_bytes(choices: Any, key: Literal["message", "delta"]) -> int:
    """Size of the text a model produced in `choices` (content, refusals, reasoning, tool calls)."""
    if not isinstance(choices, list):
        return 0
    size = 0
    for choice in choices:
        part = choice.get(key) if isinstance(choice, dict) else None
        if isinstance(part, dict):
            for field in ("content", "refusal", "reasoning_content"):
                size += _text_bytes(part.get(field))
            size += _text_bytes(part.get("tool_calls"))
    return size


def _usage(route: LlmRoute, prompt: int, completion: int) -> Usage:
    return Usage(
        calls=1,
        tokens=prompt + completion,
        cost=route.cost(prompt, completion),
        input_tokens=prompt,
        output_tokens=completion,
    )


# --- payloads the terminal hands to the renderer -----------------------------------------------------


@dataclass(slots=True)
class _Retrieved:
    """The answer to `GET /v1/models/{model}`: the model, if the listing still names it."""

    model: str


@dataclass(slots=True)
class _Json:
    """A whole JSON answer (success, or a provider's 4xx relayed as it is)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class _Relay:
    """Relays one provider stream chunk by chunk, counts what it carries, and settles the reply once."""

    def __init__(
        self, answer: LlmAnswer, route: LlmRoute, model: str, client_wants_usage: bool, prompt_estimate: int
    ) -> None:
        assert answer.events is not None
        self.answer = answer
        self.route = route
        self.model = model
        self.client_wants_usage = client_wants_usage
        self.prompt_estimate = prompt_estimate
        self.reported: tuple[int, int] | None = None
        self.generated = 0
        self.completed = False
        self.failure: str | None = None
        self.last: dict[str, Any] = {}
        self.reply: Reply | None = None
        self.body = self._events()
        self._finished = False

    def usage(self) -> Usage:
        """What the stream consumed: the provider's count, or the gateway's count of what went by."""
        if self.reported is not None:
            return _usage(self.route, *self.reported)
        return _usage(self.route, self.prompt_estimate, math.ceil(self.generated / BYTES_PER_TOKEN))

    def _rewrite(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        reported = _reported(chunk.get("usage"))
        if reported is not None:
            self.reported = reported
        if "error" in chunk:
            self.failure = "upstream_error"
            return chunk
        choices = chunk.get("choices")
        self.generated += _generated_bytes(choices, "delta")
        self.last = {"id": chunk.get("id"), "created": chunk.get("created")}
        if "model" in chunk:
            chunk["model"] = self.model
        if not self.client_wants_usage and "usage" in chunk:
            if not choices:
                return None  # the usage chunk the gateway asked for on its own account
            del chunk["usage"]
        return chunk

    def _usage_chunk(self) -> dict[str, Any]:
        usage = self.usage()
        prompt, completion = self.reported or (self.prompt_estimate, usage.tokens - self.prompt_estimate)
        return {
            "id": self.last.get("id"),
            "object": "chat.completion.chunk",
            "created": self.last.get("created"),
            "model": self.model,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": usage.tokens},
        }

    async def _events(self) -> AsyncGenerator[bytes, None]:
        assert self.answer.events is not None
        try:
            async for chunk in self.answer.events:
                out = self._rewrite(chunk)
                if out is not None:
                    yield encode_event(orjson.dumps(out))
        except GatewayError as exc:
            self.failure = exc.reason
            log.warning("LLM stream from route %s ended badly: %s", self.route.name, exc.message)
            yield encode_event(orjson.dumps(error_body(exc)))
            return
        if self.client_wants_usage and self.reported is None:
            yield encode_event(orjson.dumps(self._usage_chunk()))
        self.completed = self.failure is None
        yield encode_event(b"[DONE]")

    async def finish(self) -> None:
        """Release the provider's connection and settle the reply; idempotent, never raises."""
        if self._finished:
            return
        self._finished = True
        for close in (self.body.aclose, self.answer.close):
            try:
                await close()
            except Exception:
                log.exception("closing an LLM stream failed")
        status = "ok" if self.completed else (self.failure or "client_closed")
        if self.reply is not None:
            try:
                await self.reply.settle(self.usage(), status)
            except Exception:
                log.exception("settling an LLM stream's usage failed")


# --- the ingress ----------------------------------------------------------------------------------------


Terminal = Callable[[Call], Awaitable[Reply]]


class LlmIngress:
    """Serves the OpenAI-compatible endpoints for the configured model routes."""

    def __init__(
        self,
        pipeline: Pipeline,
        routes: LlmRoutes,
        providers: Mapping[str, LlmProvider],
        *,
        max_body_bytes: int,
    ) -> None:
        self._pipeline = pipeline
        self._routes = routes
        self._providers = providers
        self._max_body = max_body_bytes

    @classmethod
    def build(
        cls,
        specs: Sequence[LlmRouteSpec],
        pipeline: Pipeline,
        *,
        max_body_bytes: int,
        limits: Limits = DEFAULT_LIMITS,
    ) -> LlmIngress:
        """The ingress for `specs`, with one pooled client per provider kind (`limits`, under each
        route's own). The routes' credentials are the credentials stage's (`token_upstreams`).

        Raises:
            ConfigError: the routes contradict each other.
        """
        try:
            routes = LlmRoutes.load(specs)
        except LlmRouteError as exc:
            raise ConfigError(str(exc)) from exc
        provider = OpenAICompatible(HttpClient(limits=limits))
        return cls(pipeline, routes, {"openai": provider}, max_body_bytes=max_body_bytes)

    def routes(self) -> list[BaseRoute]:
        """The Starlette routes of the data plane."""
        return [
            Route(f"{ENDPOINT}/chat/completions", self.chat_completions, methods=["POST"]),
            Route(f"{ENDPOINT}/embeddings", self.embeddings, methods=["POST"]),
            Route(f"{ENDPOINT}/models", self.list_models, methods=["GET"]),
            Route(f"{ENDPOINT}/models/{{model}}", self.retrieve_model, methods=["GET"]),
        ]

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()

    def upstream_states(self) -> dict[str, UpstreamState]:
        """What the last request to each provider found."""
        return {
            who: state for provider in self._providers.values() for who, state in provider.states().items()
        }

    # --- endpoints ---
    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await _read_json(request, self._max_body)
            model = _model_of(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad("messages must be a non-empty array", "messages")
            stream = _flag(body, "stream")
            output = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
            choices = _positive_int(body, "n") or 1
        except GatewayError as exc:
            return error_response(exc)
        if not MODEL_NAME_PATTERN.fullmatch(model):
            return error_response(_unknown_model(model))
        chain = self._routes.chain(model)
        prompt = estimate_tokens(messages, messages=len(messages))
        default = chain[0].spec.default_max_tokens if chain else UNKNOWN_MODEL_MAX_TOKENS
        estimate = _estimate(chain, prompt, (output or default) * choices)
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        call = self._call(request, "call", f"llm:{model}", model, "chat.completions", body, estimate)

        async def terminal(call: Call) -> Reply:
            return await self._forward(
                call, chain, model, "chat/completions", body, stream, prompt, wants_usage
            )

        return await self._run(call, terminal)

    async def embeddings(self, request: Request) -> Response:
        try:
            body = await _read_json(request, self._max_body)
            model = _model_of(body)
            if "input" not in body or body["input"] in ("", [], None):
                raise _bad("input must be a non-empty string or array", "input")
        except GatewayError as exc:
            return error_response(exc)
        if not MODEL_NAME_PATTERN.fullmatch(model):
            return error_response(_unknown_model(model))
        chain = self._routes.chain(model)
        prompt = estimate_tokens(body["input"])
        call = self._call(
            request, "call", f"llm:{model}", model, "embeddings", body, _estimate(chain, prompt, 0)
        )

        async def terminal(call: Call) -> Reply:
            return await self._forward(call, chain, model, "embeddings", body, False, prompt, False)

        return await self._run(call, terminal)

    async def list_models(self, request: Request) -> Response:
        call = self._call(request, "list", MODELS_RESOURCE, "", "models.list", None, Usage(tokens=0))

        async def terminal(call: Call) -> Reply:
            return Reply(listing=[f"llm:{name}" for name in self._routes.names()], usage=Usage(tokens=0))

        return await self._run(call, terminal)

    async def retrieve_model(self, request: Request) -> Response:
        model = request.path_params["model"]
        if not MODEL_NAME_PATTERN.fullmatch(model):
            return error_response(_unknown_model(model))
        call = self._call(request, "list", f"llm:{model}", "", "models.retrieve", None, Usage(tokens=0))

        async def terminal(call: Call) -> Reply:
            known = self._routes.get(model) is not None
            listing = [f"llm:{model}"] if known else []
            return Reply(listing=listing, payload=_Retrieved(model), usage=Usage(tokens=0))

        return await self._run(call, terminal)

    # --- the pipeline and the provider ---
    def _call(
        self,
        request: Request,
        action: Literal["call", "list"],
        resource: str,
        upstream: str,
        method: str,
        body: Mapping[str, Any] | None,
        estimate: Usage,
    ) -> Call:
        return Call(
            protocol="llm",
            action=action,
            resource=resource,
            upstream=upstream,
            method=method,
            credentials=request.headers.get("authorization"),
            endpoint=ENDPOINT,
            run_id=request.headers.get(RUN_ID_HEADER),  # checked by `_run`
            arguments=body,
            estimate=estimate,
        )

    async def _run(self, call: Call, terminal: Terminal) -> Response:
        try:
            # Before the pipeline: a refused run id leaves no budget or audit state behind.
            call.run_id = checked_run_id(call.run_id, "the Agent-Run-Id header")
        except GatewayError as exc:
            return error_response(exc)
        produced: list[Reply] = []

        async def tracked(call: Call) -> Reply:
            reply = await terminal(call)
            produced.append(reply)
            return reply

        try:
            reply = await self._pipeline.run(call, tracked)
        except Exception as exc:
            # A stage refused the answer on its way back: a stream already opened must not leak its
            # connection or the reservation registered on it.
            for opened in produced:
                if isinstance(opened.payload, _Relay):
                    opened.payload.failure = exc.reason if isinstance(exc, GatewayError) else "internal_error"
                    await opened.payload.finish()
            return error_response(exc)
        return self._render(call, reply)

    async def _forward(
        self,
        call: Call,
        chain: Sequence[LlmRoute],
        model: str,
        operation: Operation,
        body: Mapping[str, Any],
        stream: bool,
        prompt_estimate: int,
        wants_usage: bool,
    ) -> Reply:
        if not chain:
            raise _unknown_model(model)
        failure: UpstreamError | None = None
        sent = False
        for route in chain:
            if route.name != call.upstream:
                # A fallback: the credentials stage moves the call to it, with its own credential.
                if call.switch_upstream is None:
                    call.upstream, call.upstream_authorization = route.name, None
                else:
                    await call.switch_upstream(route.name)
            provider = self._providers[route.spec.provider]
            try:
                answer = await provider.send(
                    route, operation, body, stream=stream, authorization=call.upstream_authorization
                )
            except UpstreamError as exc:
                log.warning("LLM route %s failed (%s): %s", route.name, exc.reason, exc.message)
                failure = exc
                sent = sent or exc.maybe_sent
                continue
            return self._reply(answer, route, model, operation, prompt_estimate, wants_usage)
        assert failure is not None
        call.upstream = model  # a call no route served is recorded under the model it asked for
        if len(chain) > 1:
            failure = type(failure)(f"{failure.message} (and every fallback failed)", headers=failure.headers)
        # A fallback that could not connect does not make an earlier provider's attempt unsent.
        failure.maybe_sent = sent
        raise failure

    def _reply(
        self,
        answer: LlmAnswer,
        route: LlmRoute,
        model: str,
        operation: Operation,
        prompt_estimate: int,
        wants_usage: bool,
    ) -> Reply:
        if answer.events is not None:
            relay = _Relay(answer, route, model, wants_usage, prompt_estimate)
            reply = Reply(payload=relay, streaming=True)
            relay.reply = reply
            return reply
        assert answer.body is not None
        if answer.status >= 300:
            # The provider refused the request itself (bad parameters, its rate limit): nothing consumed.
            return Reply(
                payload=_Json(answer.status, answer.body, answer.headers),
                status=f"upstream_{answer.status}",
                usage=Usage(calls=1, tokens=0, cost=0.0),
            )
        body = dict(answer.body)
        if "model" in body:
            body["model"] = model
        reported = _reported(body.get("usage"))
        if reported is None:
            generated = _generated_bytes(body.get("choices"), "message") if operation != "embeddings" else 0
            reported = (prompt_estimate, math.ceil(generated / BYTES_PER_TOKEN))
        return Reply(payload=_Json(answer.status, body, answer.headers), usage=_usage(route, *reported))

    # --- rendering ---
    def _render(self, call: Call, reply: Reply) -> Response:
        headers = {"x-request-id": call.request_id}
        payload = reply.payload
        if isinstance(payload, _Relay):
            return RelayResponse(
                payload.body,
                payload.finish,
                headers=headers | payload.answer.headers | {"cache-control": "no-cache"},
                media_type="text/event-stream",
            )
        if isinstance(payload, _Json):
            return Response(
                orjson.dumps(payload.body),
                status_code=payload.status,
                headers=headers | payload.headers,
                media_type="application/json",
            )
        allowed = [item.removeprefix("llm:") for item in reply.listing or ()]
        if isinstance(payload, _Retrieved):
            if payload.model not in allowed:
                return error_response(_unknown_model(payload.model))
            entry = _model_entry(payload.model)
            return Response(orjson.dumps(entry), headers=headers, media_type="application/json")
        listing = {"object": "list", "data": [_model_entry(name) for name in allowed]}
        return Response(orjson.dumps(listing), headers=headers, media_type="application/json")


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "agentgw"}
