"""OpenTelemetry traces of the calls through the pipeline, and W3C trace context in and out.

Two modes, chosen by `tracing.exporter`:

- `none` (the default): the gateway makes no spans. It is a transparent hop for trace context: a
  caller's valid `traceparent` (and `tracestate`) is read from the request, its trace id written into
  the call's audit records, and the same headers are sent on to the upstream unchanged.
- `otlp` (or `console`): the OpenTelemetry SDK makes one span per call (a child of the caller's
  span when it sent `traceparent`), a span per pipeline stage, each the child of the stage around it
  (stages are an onion: a stage's span holds the stages after it), and a client span for the upstream
  request, whose context the upstream receives as `traceparent`. LLM calls carry the `gen_ai.*`
  semantic-convention attributes (model, input and output tokens).

Trace context travels in context variables, not through the `Call`: `TraceContext` (ASGI, in front
of the data plane) reads the caller's headers; `TracedPipeline` runs the call inside its spans; and
`outbound_headers`, asked by the upstream HTTP client for every request it sends, reads the current
span (or the caller's headers when no span is made).

The tracer provider is the gateway's own, never the process-global one: two gateways in a process
(tests) do not share spans, and the gateway does not take over a host application's telemetry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from agentgw import __version__
from agentgw.call import Call, Reply, Usage
from agentgw.errors import ConfigError, GatewayError
from agentgw.pipeline import Admitted, CallNext, Filter, Pipeline

__all__ = [
    "TraceContext",
    "TracedPipeline",
    "Tracing",
    "TracingSettings",
    "inbound",
    "meta_context",
    "outbound_headers",
]

log = logging.getLogger(__name__)


class TracingSettings(BaseModel):
    """The `tracing:` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    # `none`: no spans (trace context is still passed through); `otlp`: spans sent over OTLP/HTTP
    # (needs the `agentgw[otlp]` extra); `console`: spans printed to standard output, for a look.
    exporter: Literal["none", "otlp", "console"] = "none"
    # The collector's OTLP/HTTP traces URL; unset: the exporter's own default and OTEL_EXPORTER_OTLP_*
    # variables (which is also where collector credentials belong: never in this file).
    endpoint: str | None = Field(default=None, max_length=2048)
    service_name: str = Field(default="agentgw", min_length=1, max_length=200)
    # Share of new traces kept; a caller's sampled flag is honoured either way (parent-based).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


# W3C Trace Context level 1: version-traceid-parentid-flags, lower-case hex; version ff is invalid,
# and an all-zero trace or parent id too. Later versions may append fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# tracestate: at most 32 list members of printable ASCII; longer values are dropped, not cut.
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class Inbound:
    """The caller's trace context, validated."""

    traceparent: str
    tracestate: str | None
    trace_id: str

    def headers(self) -> dict[str, str]:
        if self.tracestate is None:
            return {"traceparent": self.traceparent}
        return {"traceparent": self.traceparent, "tracestate": self.tracestate}


def parse_traceparent(traceparent: str, tracestate: str | None = None) -> Inbound | None:
    """The caller's context, or None when `traceparent` is not a valid W3C value (then it is ignored,
    as the W3C recommendation says: a new trace starts)."""
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if tracestate is not None and _TRACESTATE.fullmatch(tracestate) is None:
        tracestate = None
    # A later version's extra fields are not ours to forward: send on what version 00 defines.
    return Inbound(f"00-{trace_id}-{span_id}-{match.group(4)}", tracestate, trace_id)


_inbound: ContextVar[Inbound | None] = ContextVar("agentgw_inbound_trace", default=None)


def inbound() -> Inbound | None:
    """The trace context the caller of the request being served sent, if any."""
    return _inbound.get()


class TraceContext:
    """ASGI middleware: the caller's `traceparent`/`tracestate` headers, read once per request into a
    context variable for the pipeline and the upstream client (headers only; nothing else is parsed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parent: bytes | None = None
        state: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                if parent is not None:  # two: ambiguous, so neither (W3C: treat as invalid)
                    parent = b""
                    break
                parent = value
            elif name == b"tracestate":
                state = value if state is None else state + b"," + value
        if not parent:
            await self.app(scope, receive, send)
            return
        found = parse_traceparent(
            parent.decode("latin-1"), state.decode("latin-1") if state is not None else None
        )
        token = _inbound.set(found)
        try:
            await self.app(scope, receive, send)
        finally:
            _inbound.reset(token)


@contextmanager
def meta_context(params: Mapping[str, Any]) -> Iterator[None]:
    """An MCP request's trace context in `params._meta` (`traceparent`, `tracestate`: the MCP
    convention, SEP-414) taken as the caller's while the block runs, when its HTTP headers had none."""
    meta = params.get("_meta")
    parent = meta.get("traceparent") if isinstance(meta, dict) else None
    if _inbound.get() is not None or not isinstance(parent, str):
        yield
        return
    state = meta.get("tracestate") if isinstance(meta, dict) else None
    token = _inbound.set(parse_traceparent(parent, state if isinstance(state, str) else None))
    try:
        yield
    finally:
        _inbound.reset(token)


_PROPAGATOR = TraceContextTextMapPropagator()


def outbound_headers() -> Mapping[str, str] | None:
    """The trace context an upstream request sent now should carry: the current span's (the gateway's
    upstream span), else the caller's own headers unchanged, else None."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier
    found = _inbound.get()
    return found.headers() if found is not None else None


class _Stage:
    """A filter run inside a span of its own, under the stage's name (metrics key stages by it)."""

    def __init__(self, inner: Filter, name: str, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self._span_name = f"agentgw.{name}"
        self.__name__ = name

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        # Exceptions are not recorded as they are: their messages may name what a span must not carry.
        with self._tracer.start_as_current_span(
            self._span_name, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                return await self._inner(call, call_next)
            except GatewayError as exc:
                _failed(span, exc)
                raise
            except BaseException:
                span.set_status(Status(StatusCode.ERROR, "internal_error"))
                raise


def _failed(span: Span, exc: GatewayError) -> None:
    span.set_status(Status(StatusCode.ERROR, exc.reason))
    span.set_attribute("agentgw.reason", exc.reason)


# gen_ai.operation.name by the LLM ingress's wire method.
_GEN_AI_OPERATIONS = {"chat.completions": "chat", "embeddings": "embeddings"}


# Caller-chosen strings (a tool name, a method) are cut to this in span attributes, as in audit records.
MAX_ATTRIBUTE = 256


def _capped(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE else text[:MAX_ATTRIBUTE] + "..."


def _call_attributes(call: Call) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "agentgw.request_id": call.request_id,
        "agentgw.protocol": call.protocol,
        "agentgw.action": call.action,
        "agentgw.resource": _capped(call.resource),
        "agentgw.upstream": _capped(call.upstream),
        "agentgw.method": _capped(call.method),
    }
    if call.run_id is not None:
        attributes["agentgw.run_id"] = call.run_id
    return attributes


def _usage_attributes(call: Call, usage: Usage | None) -> dict[str, Any]:
    if call.protocol != "llm":
        return {}
    attributes: dict[str, Any] = {"gen_ai.request.model": _capped(call.resource.removeprefix("llm:"))}
    operation = _GEN_AI_OPERATIONS.get(call.method)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if call.upstream:
        attributes["agentgw.llm.route"] = call.upstream
    if usage is not None and (usage.input_tokens or usage.output_tokens):
        attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
    return attributes


class TracedPipeline(Pipeline):
    """The pipeline, each call run inside its span tree."""

    def __init__(self, pipeline: Pipeline, tracer: Tracer) -> None:
        admitted = pipeline.admitted
        traced_admitted: Admitted | None = None
        if admitted is not None:
            hook = admitted

            async def traced_admitted(call: Call) -> None:
                with tracer.start_as_current_span("agentgw.admitted", record_exception=False):
                    await hook(call)

        super().__init__(
            [_Stage(f, name, tracer) for f, name in zip(pipeline.filters, pipeline.stages, strict=False)],
            traced_admitted,
            pipeline.observer,
        )
        self.stages = pipeline.stages
        self._tracer = tracer

    async def run(self, call: Call, terminal: CallNext) -> Reply:
        """Run `call` inside a span of its own, a child of the caller's span when it sent one.

        Raises:
            GatewayError: a stage refused the call, or the upstream failed.
        """
        found = _inbound.get()
        parent: Context | None = _PROPAGATOR.extract(found.headers()) if found is not None else None
        tracer = self._tracer
        span = tracer.start_span(
            f"{call.protocol} {_capped(call.method)}", parent, SpanKind.SERVER, _call_attributes(call)
        )
        call.trace_id = format(span.get_span_context().trace_id, "032x")

        async def upstream(current: Call) -> Reply:
            child = tracer.start_span(
                f"agentgw.upstream {_capped(current.upstream)}",
                kind=SpanKind.CLIENT,
                attributes={"agentgw.upstream": _capped(current.upstream)},
            )
            with trace.use_span(child, end_on_exit=False, record_exception=False):
                try:
                    reply = await terminal(current)
                except GatewayError as exc:
                    _failed(child, exc)
                    child.end()
                    raise
                except BaseException:
                    child.end()
                    raise
            _ended_with(child, current, reply)
            return reply

        with trace.use_span(span, end_on_exit=False, record_exception=False):
            try:
                reply = await super().run(call, upstream)
            except GatewayError as exc:
                _failed(span, exc)
                span.set_attribute(
                    "agentgw.decision", "denied" if exc.http_status in (401, 403, 429) else "error"
                )
                if call.decided_by is not None:
                    span.set_attribute("agentgw.rule", call.decided_by)
                span.end()
                raise
            except BaseException:
                span.set_status(Status(StatusCode.ERROR, "internal_error"))
                span.end()
                raise
        span.set_attribute("agentgw.decision", "allowed")
        if call.decided_by is not None:
            span.set_attribute("agentgw.rule", call.decided_by)
        _ended_with(span, call, reply)
        return reply


def _ended_with(span: Span, call: Call, reply: Reply) -> None:
    """End `span` now, or when a streamed answer ends, with what the call consumed."""

    def finish(usage: Usage | None) -> None:
        span.set_attribute("agentgw.status", reply.status)
        span.set_attributes(_usage_attributes(call, usage))
        if reply.status not in ("ok",) and not reply.status.startswith("upstream_2"):
            span.set_status(Status(StatusCode.ERROR, reply.status))
        span.end()

    if not reply.streaming:
        finish(reply.usage)
        return

    async def settled(usage: Usage) -> None:
        finish(usage)

    reply.on_settle(settled)


class Tracing:
    """The gateway's tracer provider (or none) and what wraps the pipeline."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        """`exporter`, when given, receives every span synchronously whatever `settings` say (tests).

        Raises:
            ConfigError: `otlp` is asked for and its exporter package is not installed.
        """
        self.provider: TracerProvider | None = None
        if exporter is None and settings.exporter == "none":
            return
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name, "service.version": __version__}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.exporter == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp(settings.endpoint)))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        self.provider = provider

    def pipeline(self, pipeline: Pipeline) -> Pipeline:
        """`pipeline` with its calls traced; itself when no spans are made."""
        if self.provider is None:
            return _Passing(pipeline)
        return TracedPipeline(pipeline, self.provider.get_tracer("agentgw", __version__))

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter."""
        if self.provider is not None:
            self.provider.shutdown()


class _Passing(Pipeline):
    """No spans: only the caller's trace id, into the call (and so its audit records)."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(pipeline.filters, pipeline.admitted, pipeline.observer)
        self.stages = pipeline.stages

    async def run(self, call: Call, terminal: CallNext) -> Reply:
        found = _inbound.get()
        if found is not None:
            call.trace_id = found.trace_id
        return await super().run(call, terminal)


def _otlp(endpoint: str | None) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "tracing.exporter is otlp but the OTLP exporter is not installed: pip install 'agentgw[otlp]'"
        ) from exc
    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    return exporter
