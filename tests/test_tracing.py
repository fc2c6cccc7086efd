"""Trace context parsing and the traced pipeline, in process (end to end: tests/e2e/test_tracing.py)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.types import Message, Receive, Scope, Send

from agentgw.call import Call, Reply
from agentgw.pipeline import CallNext, Pipeline
from agentgw.tracing import (
    TraceContext,
    Tracing,
    TracingSettings,
    inbound,
    outbound_headers,
    parse_traceparent,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"),
        # A later version is read as version 00 and sent on as one (its extra fields are not ours).
        (f"01-{TRACE}-{SPAN}-01-extra", f"00-{TRACE}-{SPAN}-01"),
        (f"ff-{TRACE}-{SPAN}-01", None),
        (f"00-{TRACE}-{SPAN}-01-extra", None),
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{SPAN}-01", None),
        (f"00-{TRACE}-{SPAN}", None),
        ("<script>", None),
    ],
)
def test_only_a_valid_w3c_traceparent_is_taken(value: str, expected: str | None) -> None:
    found = parse_traceparent(value)
    assert (found.traceparent if found else None) == expected


def test_a_tracestate_with_control_characters_is_dropped_and_the_parent_kept() -> None:
    found = parse_traceparent(f"00-{TRACE}-{SPAN}-01", "a=1\r\nx-injected: yes")
    assert (
        found is not None
        and found.tracestate is None
        and found.headers() == {"traceparent": found.traceparent}
    )


async def _request(headers: list[tuple[bytes, bytes]]) -> object:
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(inbound())

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        return None

    await TraceContext(app)({"type": "http", "headers": headers}, receive, send)
    assert inbound() is None  # reset after the request
    return seen[0]


async def test_two_traceparent_headers_are_ambiguous_and_neither_is_taken() -> None:
    one = (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())
    found = await _request([one, (b"tracestate", b"a=1"), (b"tracestate", b"b=2")])
    assert found is not None and getattr(found, "tracestate", None) == "a=1,b=2"
    assert await _request([one, (b"traceparent", f"00-{TRACE}-{'1' * 16}-01".encode())]) is None


class _Crash:
    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        raise RuntimeError("secret-token-in-a-message")


async def _terminal(call: Call) -> Reply:
    return Reply(payload=outbound_headers())


async def test_a_crashing_stage_marks_its_span_without_the_exceptions_message() -> None:
    exporter = InMemorySpanExporter()
    pipeline = Tracing(TracingSettings(), exporter).pipeline(Pipeline([_Crash()]))
    call = Call("mcp", "call", "mcp:s/t", "s", "tools/call")
    with pytest.raises(RuntimeError):
        await pipeline.run(call, _terminal)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"mcp tools/call", "agentgw._crash"}
    for span in spans.values():
        assert span.status.status_code is StatusCode.ERROR
        assert "secret" not in (span.status.description or "") and not span.events
    assert call.trace_id == format(spans["mcp tools/call"].context.trace_id, "032x")


async def test_without_an_exporter_no_span_is_made_and_nothing_goes_upstream_uninvited() -> None:
    pipeline = Tracing(TracingSettings()).pipeline(Pipeline([]))
    call = Call("mcp", "call", "mcp:s/t", "s", "tools/call")
    reply = await pipeline.run(call, _terminal)
    assert reply.payload is None and call.trace_id is None
