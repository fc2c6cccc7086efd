"""A runaway agent against a slow or broken upstream is stopped: a call that may have reached the
upstream is charged, one that never left the gateway is given back.

A real gateway process in front of the modern MCP fixture (its `slow` tool sleeps past the server's
`timeout_s`) and the OpenAI-compatible fixture (its `slow-model` answers after the route's timeout);
both record what they receive, so the tests count what reached them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conformance.fixtures.openai_upstream import start_openai_upstream_sync
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, MODERN, answer_of, modern_headers
from tests.support.servers import unused_url

LIMIT = 3
TIMEOUT_S = 0.5
SLEEP_S = 3  # the slow tool's sleep: well past the gateway's timeout


@pytest.fixture(scope="module")
def llm_upstream() -> Iterator[str]:
    with start_openai_upstream_sync() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, llm_upstream: str
) -> Iterator[RunningGateway]:
    def route(name: str, model: str, base_url: str) -> dict[str, Any]:
        return {"name": name, "base_url": base_url, "model": model, "timeout_s": TIMEOUT_S}

    config = {
        "allow_anonymous": True,
        "servers": [
            {"name": "slowtool", "url": f"{modern_upstream}/mcp", "timeout_s": TIMEOUT_S},
            {"name": "down", "url": f"{unused_url()}/mcp", "timeout_s": TIMEOUT_S},
        ],
        "virtual_servers": [{"name": "slow-bridged", "tools": ["slowtool/slow"]}],
        "llm_routes": [
            route("slow", "slow-model", f"{llm_upstream}/v1"),
            route("down", "fixture-chat", f"{unused_url()}/v1"),
        ],
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow", "p, anonymous, llm:*, *, allow"]},
        "budgets": {"rules": [{"name": "runaway", "per": "run", "match": "runaway-*", "calls": LIMIT}]},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def slow_calls_received(modern_upstream: str) -> int:
    received = httpx.get(f"{modern_upstream}/_fixture/received").json()
    return sum(1 for r in received if r["method"] == "tools/call" and r["name"] == "slow")


def chats_received(llm_upstream: str, model: str) -> int:
    received = httpx.get(f"{llm_upstream}/_fixture/received").json()
    return sum(
        1
        for r in received
        if r["path"] == "/v1/chat/completions" and isinstance(r["body"], dict) and r["body"]["model"] == model
    )


def tool_call(gateway: RunningGateway, server: str, run: str, n: int) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": n,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": SLEEP_S}, "_meta": META},
    }
    headers = modern_headers("tools/call", "slow") | {"agent-run-id": run}
    return answer_of(httpx.post(gateway.mcp(server), json=body, headers=headers, timeout=30))


def test_a_tool_that_times_out_is_charged_so_a_runaway_run_is_stopped(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    run = f"runaway-{uuid.uuid4().hex[:8]}"
    before = slow_calls_received(modern_upstream)
    answers = [tool_call(gateway, "slowtool", run, n) for n in range(LIMIT + 2)]
    errors = [a["error"] for a in answers]
    assert [e["message"] for e in errors[:LIMIT]] == [
        f"upstream 'slowtool' did not answer within {TIMEOUT_S:g}s"
    ] * LIMIT
    assert [e["code"] for e in errors[LIMIT:]] == [-32029, -32029]
    assert errors[LIMIT]["data"]["budget"] == "runaway" and errors[LIMIT]["data"]["used"] == LIMIT
    assert slow_calls_received(modern_upstream) - before == LIMIT


async def test_a_bridged_tool_that_times_out_is_charged_as_well(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    run = f"runaway-{uuid.uuid4().hex[:8]}"
    before = slow_calls_received(modern_upstream)
    async with (
        httpx.AsyncClient(headers={"Agent-Run-Id": run}, timeout=30) as http,
        Client(streamable_http_client(gateway.mcp("slow-bridged"), http_client=http), mode=MODERN) as client,
    ):
        codes = []
        for _ in range(LIMIT + 1):
            with pytest.raises(MCPError) as failed:
                await client.call_tool("slowtool__slow", {"seconds": SLEEP_S})
            codes.append(failed.value.code)
    assert codes == [-32603] * LIMIT + [-32029]
    assert slow_calls_received(modern_upstream) - before == LIMIT


def _anonymous(request: httpx2.Request) -> None:
    # The SDK insists on sending an API key; the gateway admits `anonymous` only without credentials.
    del request.headers["authorization"]


@pytest.fixture(scope="module")
def llm(gateway: RunningGateway) -> Iterator[openai.OpenAI]:
    http = httpx2.Client(event_hooks={"request": [_anonymous]}, timeout=20)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


def test_a_model_that_times_out_is_charged_so_a_runaway_run_is_stopped(
    llm: openai.OpenAI, llm_upstream: str
) -> None:
    run = f"runaway-{uuid.uuid4().hex[:8]}"
    before = chats_received(llm_upstream, "slow-model")
    statuses = []
    for _ in range(LIMIT + 2):
        with pytest.raises(openai.APIStatusError) as failed:
            llm.chat.completions.create(
                model="slow",
                messages=[{"role": "user", "content": "hello"}],
                extra_headers={"Agent-Run-Id": run},
            )
        statuses.append(failed.value.status_code)
    assert statuses == [504] * LIMIT + [429, 429]
    assert chats_received(llm_upstream, "slow-model") - before == LIMIT


def test_a_refused_connection_gives_the_reservation_back(gateway: RunningGateway, llm: openai.OpenAI) -> None:
    # Nothing reached the upstream, so nothing is charged: the budget never stops these calls.
    run = f"runaway-{uuid.uuid4().hex[:8]}"
    answers = [tool_call(gateway, "down", run, n) for n in range(LIMIT + 2)]
    assert [a["error"]["message"] for a in answers] == ["upstream 'down' is unreachable"] * (LIMIT + 2)
    statuses = []
    for _ in range(LIMIT + 2):
        with pytest.raises(openai.APIStatusError) as failed:
            llm.chat.completions.create(
                model="down",
                messages=[{"role": "user", "content": "hello"}],
                extra_headers={"Agent-Run-Id": run},
            )
        statuses.append(failed.value.status_code)
    assert statuses == [502] * (LIMIT + 2)
