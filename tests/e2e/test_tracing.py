"""Traces end to end: the official MCP SDK and openai clients send a W3C `traceparent` through a
gateway served by uvicorn to real upstreams on 127.0.0.1 (the SDK's own MCP server, an
OpenAI-compatible answerer), with the gateway's spans caught by an in-memory exporter."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.types import ASGIApp, Receive, Scope, Send

from agentgw.app import GatewayApp, create_app
from agentgw.demo.upstream import demo_server
from agentgw.settings import load_settings
from agentgw.storage.audit import AuditQuery, query
from tests.support.mcp import META, modern_headers
from tests.support.servers import Answer, LocalServer, Received, Scripted

CALLER_TRACE = secrets.token_hex(16)
CALLER_SPAN = secrets.token_hex(8)
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
STAGES = ["audit", "authenticate", "authorize", "budget", "credentials"]
PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7


@dataclass
class Recorder:
    """An upstream app with the headers of every request it received kept (names lower-cased)."""

    app: ASGIApp
    headers: list[dict[str, str]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await self.app(scope, receive, send)


def completion(request: Received) -> Answer:
    if orjson.loads(request.content).get("stream"):
        return streamed()
    body = {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "provider-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    }
    return Answer(200, [orjson.dumps(body)], {"content-type": "application/json"})


def streamed() -> Answer:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "provider-model"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {
            **chunk,
            "choices": [],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            },
        },
    ]
    body = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    return Answer(200, body, {"content-type": "text/event-stream"})


@dataclass
class Running:
    app: GatewayApp
    url: str
    mcp_seen: Recorder
    llm_seen: Scripted


@asynccontextmanager
async def gateway(tmp_path: Path, exporter: InMemorySpanExporter | None) -> AsyncIterator[Running]:
    demo = demo_server()
    mcp_seen = Recorder(demo.streamable_http_app(host="127.0.0.1"))
    llm_seen = Scripted(completion)
    mcp_server, llm_server, front = LocalServer(), LocalServer(), LocalServer()
    settings = load_settings(
        None,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'gw.db'}",
        public_url=front.url,
        allow_anonymous=True,
        servers=[{"name": "demo", "url": f"{mcp_server.url}/mcp"}],
        llm_routes=[{"name": "chat", "base_url": f"{llm_server.url}/v1", "model": "provider-model"}],
        policy={
            "rules": [
                "p, anonymous, mcp:demo/*, *, allow",
                "p, anonymous, mcp:demo/delete_repo, call, deny",
                "p, anonymous, llm:chat, *, allow",
            ]
        },
    )
    app = create_app(settings, span_exporter=exporter)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(mcp_server.serve(mcp_seen))
        await stack.enter_async_context(llm_server.serve(llm_seen))
        await stack.enter_async_context(front.serve(app))
        yield Running(app, front.url, mcp_seen, llm_seen)


async def call_tools(url: str) -> None:
    """One allowed and one denied tools/call, every request carrying the caller's trace context."""
    async with (
        httpx.AsyncClient(headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"}) as http,
        Client(streamable_http_client(f"{url}/mcp/demo", http_client=http)) as client,
    ):
        assert not (await client.call_tool("get_weather", {"city": "Oslo"})).is_error
        with pytest.raises(MCPError):
            await client.call_tool("delete_repo", {"name": "x"})


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def tree_under(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[str]:
    """The names on the chain of first children from `root` down."""
    names, current = [], root
    while True:
        children = [s for s in spans if parent_of(s) == current.context.span_id]
        if not children:
            return names
        # A stage's children: the next stage, or the admission hook and then the upstream.
        children.sort(key=lambda s: s.start_time or 0)
        names.append(",".join(c.name for c in children))
        current = children[-1]


async def test_a_call_is_one_span_per_stage_under_the_callers_and_the_upstream_joins_it(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    async with gateway(tmp_path, exporter) as gw:
        await call_tools(gw.url)
        await gw.app.state.gateway.audit_log.flush()
        records = query(gw.app.state.gateway.audit_log.engine, AuditQuery(resource="mcp:demo/*"), limit=50)
    spans = exporter.get_finished_spans()
    calls = [s for s in by_name(spans, "mcp tools/call") if s.attributes]
    allowed = next(
        s for s in calls if s.attributes and s.attributes["agentgw.resource"] == "mcp:demo/get_weather"
    )
    denied = next(
        s for s in calls if s.attributes and s.attributes["agentgw.resource"] == "mcp:demo/delete_repo"
    )
    # The call's span continues the caller's trace, as a child of the caller's span.
    assert format(allowed.context.trace_id, "032x") == CALLER_TRACE
    assert parent_of(allowed) == int(CALLER_SPAN, 16)
    assert tree_under(spans, allowed) == [
        *(f"agentgw.{stage}" for stage in STAGES),
        "agentgw.admitted,agentgw.upstream demo",
    ]
    assert allowed.attributes is not None and allowed.attributes["agentgw.decision"] == "allowed"
    # The denied call stops at the policy stage, and says why.
    assert tree_under(spans, denied) == ["agentgw.audit", "agentgw.authenticate", "agentgw.authorize"]
    assert denied.status.status_code is StatusCode.ERROR
    assert denied.attributes is not None and denied.attributes["agentgw.reason"] == "denied_by_policy"
    # The upstream got the gateway's upstream span as its parent, in the caller's trace.
    upstream_span = next(
        s for s in spans if s.name == "agentgw.upstream demo" and s.parent == allowed_parent(spans, allowed)
    )
    sent = [h for h in gw.mcp_seen.headers if "traceparent" in h]
    assert f"00-{CALLER_TRACE}-{upstream_span.context.span_id:016x}-01" in [h["traceparent"] for h in sent]
    assert all(h["tracestate"] == "vendor=1" for h in sent)
    # An auditor goes from either record of a call to its trace.
    assert records and {r["trace_id"] for r in records} == {CALLER_TRACE}


def allowed_parent(spans: tuple[ReadableSpan, ...], call: ReadableSpan) -> Any:
    """The span context of the credentials stage of `call` (the upstream span's parent)."""
    current = call
    for stage in STAGES:
        current = next(
            s for s in spans if s.name == f"agentgw.{stage}" and parent_of(s) == current.context.span_id
        )
    return current.context


async def anonymous(request: httpx2.Request) -> None:
    # The SDK insists on sending an API key; the gateway admits `anonymous` only without credentials.
    del request.headers["authorization"]


async def test_llm_spans_carry_the_gen_ai_model_and_token_counts(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with (
        gateway(tmp_path, exporter) as gw,
        openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1",
            api_key="unused",
            default_headers={"traceparent": TRACEPARENT},
            max_retries=0,
            http_client=httpx2.AsyncClient(event_hooks={"request": [anonymous]}),
        ) as client,
    ):
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    spans = exporter.get_finished_spans()
    upstream = next(s for s in spans if s.name == "agentgw.upstream chat")
    assert upstream.attributes is not None
    assert upstream.attributes["gen_ai.request.model"] == "chat"
    assert upstream.attributes["gen_ai.operation.name"] == "chat"
    assert upstream.attributes["gen_ai.usage.input_tokens"] == PROMPT_TOKENS
    assert upstream.attributes["gen_ai.usage.output_tokens"] == COMPLETION_TOKENS
    assert format(upstream.context.trace_id, "032x") == CALLER_TRACE
    (request,) = gw.llm_seen.received
    assert request.headers["traceparent"] == f"00-{CALLER_TRACE}-{upstream.context.span_id:016x}-01"


async def test_a_streamed_answers_spans_end_with_it_and_carry_its_token_counts(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with (
        gateway(tmp_path, exporter) as gw,
        openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx2.AsyncClient(event_hooks={"request": [anonymous]}),
        ) as client,
    ):
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == "hi"
    spans = exporter.get_finished_spans()
    upstream = next(s for s in spans if s.name == "agentgw.upstream chat")
    call = next(s for s in spans if s.name == "llm chat.completions")
    assert upstream.attributes is not None
    assert upstream.attributes["gen_ai.usage.input_tokens"] == PROMPT_TOKENS
    assert upstream.attributes["gen_ai.usage.output_tokens"] == COMPLETION_TOKENS
    # The call's span lasts until the stream has ended, not only until the upstream answered.
    assert call.end_time is not None and upstream.end_time is not None and call.end_time >= upstream.end_time


async def test_without_an_exporter_the_callers_context_is_recorded_and_passed_on_unchanged(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, None) as gw:
        assert gw.app.state.gateway.tracing.provider is None
        await call_tools(gw.url)
        await gw.app.state.gateway.audit_log.flush()
        records = query(gw.app.state.gateway.audit_log.engine, AuditQuery(resource="mcp:demo/*"), limit=50)
    sent = [h["traceparent"] for h in gw.mcp_seen.headers if "traceparent" in h]
    assert sent and set(sent) == {TRACEPARENT}
    assert records and {r["trace_id"] for r in records} == {CALLER_TRACE}


async def test_a_malformed_traceparent_is_ignored_and_not_passed_on(tmp_path: Path) -> None:
    async with gateway(tmp_path, None) as gw:
        async with httpx.AsyncClient() as http:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            bad = f"00-{'0' * 32}-{CALLER_SPAN}-01"
            answer = await http.post(f"{gw.url}/v1/chat/completions", json=body, headers={"traceparent": bad})
        assert answer.status_code == 200
        await gw.app.state.gateway.audit_log.flush()
        records = query(gw.app.state.gateway.audit_log.engine, AuditQuery(resource="llm:chat"), limit=10)
    (request,) = gw.llm_seen.received
    assert "traceparent" not in request.headers
    assert records and {r["trace_id"] for r in records} == {None}


async def test_trace_context_in_an_mcp_requests_meta_is_the_callers_when_no_header_carries_one(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    params = {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
        "_meta": {**META, "traceparent": TRACEPARENT},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    async with gateway(tmp_path, exporter) as gw:
        async with httpx.AsyncClient() as http:
            await http.post(
                f"{gw.url}/mcp/demo", json=body, headers=modern_headers("tools/call", "get_weather")
            )
        await gw.app.state.gateway.audit_log.flush()
        records = query(gw.app.state.gateway.audit_log.engine, AuditQuery(resource="mcp:demo/*"), limit=10)
    call = next(s for s in exporter.get_finished_spans() if s.name == "mcp tools/call")
    assert format(call.context.trace_id, "032x") == CALLER_TRACE and parent_of(call) == int(CALLER_SPAN, 16)
    assert records and {r["trace_id"] for r in records} == {CALLER_TRACE}
    # The message itself, _meta included, reaches the upstream as the caller sent it.
    sent = [h["traceparent"] for h in gw.mcp_seen.headers if "traceparent" in h]
    assert sent and all(value.startswith(f"00-{CALLER_TRACE}-") for value in sent)
