"""The official `openai` client through a real gateway process to the OpenAI-compatible fixture.

Callers are `anonymous` (the gateway allows it here); policy allows every model but `secret`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from openai.types.chat import ChatCompletionMessageParam

from conformance.fixtures.launch import free_port
from conformance.fixtures.openai_upstream import start_openai_upstream_sync
from tests.support.gateway import RunningGateway, run_gateway

ROUTE_SECRET = "e2e-route-secret-91c2"
IN_PRICE, OUT_PRICE = 2.0, 8.0  # per million tokens
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
# 30 words in, 31 out: far more than the 1-token default reservation of the `wordy` route.
LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": " ".join(["word"] * 30)}]
AUDIT_WAIT_S = 10.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with start_openai_upstream_sync() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: str, modern_upstream: str
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gw")
    key = tmp / "route.key"
    key.write_text(ROUTE_SECRET)
    api = f"{upstream}/v1"

    def route(name: str, model: str, **extra: Any) -> dict[str, Any]:
        credential = {"mode": "static", "secret": "route-key"}
        prices = {"input_price": IN_PRICE, "output_price": OUT_PRICE}
        return {"name": name, "base_url": api, "model": model, "credential": credential} | prices | extra

    config = {
        "allow_anonymous": True,
        "max_body_bytes": 64 * 1024,
        "secrets": {"route-key": {"file": str(key)}},
        "servers": [{"name": "tools", "url": f"{modern_upstream}/mcp"}],
        "llm_routes": [
            route("chat", "fixture-chat"),
            route("secret", "fixture-chat"),
            route("embed", "fixture-embed"),
            route("wordy", "fixture-chat", default_max_tokens=1),
            route("slow", "slow-model", timeout_s=0.5),
            route("cut", "cut-model"),
            route("down", "fixture-chat", base_url=f"http://127.0.0.1:{free_port()}/v1"),
        ],
        "policy": {
            "rules": [
                "p, anonymous, llm:*, *, allow",
                "p, anonymous, llm:secret, *, deny",
                "p, anonymous, mcp:tools/*, *, allow",
            ]
        },
        "budgets": {"rules": [{"name": "run-tokens", "per": "run", "tokens": 50}]},
    }
    with run_gateway(tmp, config) as gw:
        yield gw


def _anonymous(request: httpx2.Request) -> None:
    # The SDK insists on sending an API key; the gateway admits `anonymous` only without credentials.
    del request.headers["authorization"]


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[openai.OpenAI]:
    http = httpx2.Client(event_hooks={"request": [_anonymous]}, timeout=20)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


def received(upstream: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{upstream}/_fixture/received").json()
    return records


def audit_outcome(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    """The outcome record of `request_id` in the gateway's audit log, once its writer has committed it."""
    path = gateway.database_url.removeprefix("sqlite:///")
    query = "SELECT * FROM audit_log WHERE request_id = ? AND event = 'outcome'"
    deadline = time.monotonic() + AUDIT_WAIT_S
    while True:
        with closing(sqlite3.connect(path)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(query, (request_id,)).fetchall()
        if rows:
            return dict(rows[0])
        assert time.monotonic() < deadline, f"no outcome record for {request_id}; {gateway.output()}"
        time.sleep(0.05)  # polling the committed log: group commits land within milliseconds


def test_the_client_lists_only_allowed_models_and_chats_in_json_and_stream(client: openai.OpenAI) -> None:
    models = sorted(m.id for m in client.models.list())
    assert models == ["chat", "cut", "down", "embed", "slow", "wordy"]
    answer = client.chat.completions.create(model="chat", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hello there" and answer.model == "chat"
    stream = client.chat.completions.create(model="chat", messages=HELLO, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == "echo: hello there"
    vectors = client.embeddings.create(model="embed", input="one two")
    assert vectors.data[0].embedding == [7.0, 0.0, 0.5, -0.5]


def test_a_denied_model_is_invisible_and_refused_with_403(client: openai.OpenAI, upstream: str) -> None:
    httpx.post(f"{upstream}/_fixture/reset")
    assert "secret" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="secret", messages=HELLO)
    assert caught.value.code == "denied_by_policy"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("secret")
    assert received(upstream) == []


def test_the_routes_credential_goes_upstream_never_the_callers(
    gateway: RunningGateway, client: openai.OpenAI, upstream: str
) -> None:
    httpx.post(f"{upstream}/_fixture/reset")
    client.chat.completions.create(model="chat", messages=HELLO)
    assert [r["authorization"] for r in received(upstream)] == [f"Bearer {ROUTE_SECRET}"]
    refused = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "chat", "messages": HELLO},
        headers={"authorization": "Bearer caller-token-xyz"},
    )
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert all("caller-token-xyz" not in str(r) for r in received(upstream))
    assert ROUTE_SECRET not in gateway.output() and "caller-token-xyz" not in gateway.output()


def test_slow_down_and_cut_providers_give_clear_errors(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as slow:
        client.chat.completions.create(model="slow", messages=HELLO)
    assert slow.value.status_code == 504 and slow.value.code == "upstream_timeout"
    assert time.monotonic() - started < 5
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="down", messages=HELLO)
    assert down.value.status_code == 502 and "unreachable" in down.value.message
    stream = client.chat.completions.create(
        model="cut", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    with pytest.raises(openai.APIError, match="broke off the stream"):
        for _ in stream:
            pass


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"model": "chat", "messages": [', "application/json", 400),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "application/json", 400),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', "application/json", 404),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}', "text/plain", 415),
        (b'{"model": "chat", "messages": ["' + b"x" * 70_000 + b'"]}', "application/json", 413),
    ],
    ids=["malformed-json", "missing-model", "unknown-model", "wrong-content-type", "oversized"],
)
def test_bad_input_gets_an_openai_shaped_4xx(
    gateway: RunningGateway, content: bytes, content_type: str, status: int
) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_audit_log_records_tokens_and_cost_as_usage_times_the_route_prices(
    gateway: RunningGateway, client: openai.OpenAI, stream: bool
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat",
        messages=HELLO,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    request_id = raw.headers["x-request-id"]
    parsed = raw.parse()
    # A stream's usage is in its last chunk (the client asked for it); a completion carries its own.
    answers = list(parsed) if isinstance(parsed, openai.Stream) else [parsed]
    usage = answers[-1].usage
    assert usage is not None
    record = audit_outcome(gateway, request_id)
    assert (record["protocol"], record["resource"], record["upstream"]) == ("llm", "llm:chat", "chat")
    assert record["tokens"] == usage.total_tokens
    expected = (usage.prompt_tokens * IN_PRICE + usage.completion_tokens * OUT_PRICE) / 1_000_000
    assert record["cost"] == pytest.approx(expected)


async def test_a_run_whose_tokens_llm_calls_spent_is_refused_mcp_tool_calls(gateway: RunningGateway) -> None:
    run = {"agent-run-id": f"run-{time.monotonic_ns()}"}
    async with (
        httpx2.AsyncClient(headers=run) as mcp_http,
        httpx2.AsyncClient(headers=run, event_hooks={"request": [_async_anonymous]}) as llm_http,
        Client(streamable_http_client(gateway.mcp("tools"), http_client=mcp_http), mode="2026-07-28") as mcp,
    ):
        assert not (await mcp.call_tool("echo", {"text": "before"})).is_error
        llm = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="unused", http_client=llm_http, max_retries=0
        )
        # Reserves 1 output token, but the answer costs 61: the run's 50 tokens are gone.
        answer = await llm.chat.completions.create(model="wordy", messages=LONG)
        assert answer.usage is not None and answer.usage.total_tokens > 50
        with pytest.raises(openai.RateLimitError, match="run-tokens"):
            await llm.chat.completions.create(model="chat", messages=HELLO)
        with pytest.raises(MCPError, match="run-tokens"):
            await mcp.call_tool("echo", {"text": "after"})


async def _async_anonymous(request: httpx2.Request) -> None:
    _anonymous(request)
