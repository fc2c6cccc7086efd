"""Budgets end to end: a real gateway in front of the modern fixture upstream, which counts what it gets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conformance.fixtures.launch import FixtureStartError
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, MODERN, modern_headers

BUDGETS = [
    {"name": "burst-run", "per": "run", "match": "burst-*", "calls": 10},
    {"name": "sdk-run", "per": "run", "match": "sdk-*", "calls": 2},
    {"name": "win-run", "per": "run", "match": "win-*", "window": "minute", "calls": 1},
]


@pytest.fixture(scope="module", params=["local", "sql", "redis"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, modern_upstream: str
) -> Iterator[RunningGateway]:
    store = {
        "store": request.param,
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_prefix": f"agentgw-test:{uuid.uuid4().hex}:",
    }
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": [
                "p, anonymous, mcp:modern/*, *, allow",
                "p, anonymous, admin:budgets, read, allow",
                "p, anonymous, admin:budgets, write, allow",
            ]
        },
        "budgets": {"rules": BUDGETS, **store},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def read_item(uri: str, msg_id: int) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "resources/read", "params": {"uri": uri, "_meta": META}}
    return body, modern_headers("resources/read", uri)


async def upstream_uris(upstream: str, prefix: str) -> list[str]:
    async with httpx.AsyncClient() as http:
        received = (await http.get(f"{upstream}/_fixture/received")).json()
    return [
        r["uri"] for r in received if r["method"] == "resources/read" and (r["uri"] or "").startswith(prefix)
    ]


async def test_a_run_budget_of_ten_forwards_exactly_ten_of_a_hundred_concurrent_calls(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"fixture://items/{tag}-"
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:

        async def one(n: int) -> dict[str, Any]:
            body, headers = read_item(f"{prefix}{n}", n)
            response = await http.post(
                gateway.mcp("modern"), json=body, headers=headers | {"agent-run-id": f"burst-{tag}"}
            )
            assert response.status_code == 200
            answer: dict[str, Any] = response.json()
            return answer

        answers = await asyncio.gather(*(one(n) for n in range(100)))
    errors = [a["error"] for a in answers if "error" in a]
    assert len(errors) == 90
    assert {e["code"] for e in errors} == {-32029}
    assert all(e["data"]["budget"] == "burst-run" for e in errors)
    assert len(await upstream_uris(modern_upstream, prefix)) == 10


async def test_the_official_sdk_client_reads_the_exhaustion_error(gateway: RunningGateway) -> None:
    run = f"sdk-{uuid.uuid4().hex[:8]}"
    async with (
        httpx.AsyncClient(headers={"Agent-Run-Id": run}) as http,
        Client(streamable_http_client(gateway.mcp("modern"), http_client=http), mode=MODERN) as client,
    ):
        for _ in range(2):
            assert not (await client.call_tool("echo", {"text": "hi"})).is_error
        await client.list_tools()  # discovery spends nothing
        with pytest.raises(MCPError) as refused:
            await client.call_tool("echo", {"text": "one too many"})
    error = refused.value
    assert error.code == -32029
    assert "budget 'sdk-run' exhausted" in error.message and "start a new run" in error.message
    assert error.data["budget"] == "sdk-run" and error.data["used"] == 2 and error.data["limit"] == 2


async def test_a_windowed_exhaustion_says_when_it_resets_and_sends_retry_after(
    gateway: RunningGateway,
) -> None:
    run = f"win-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient() as http:
        answers = []
        for n in range(2):
            body, headers = read_item(f"fixture://items/{run}-{n}", n)
            answers.append(
                await http.post(gateway.mcp("modern"), json=body, headers=headers | {"agent-run-id": run})
            )
    refused = answers[1]
    error = refused.json()["error"]
    assert error["code"] == -32029 and "it resets at" in error["message"]
    assert error["data"]["resetsAt"].endswith(":00Z")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert error["data"]["retryAfter"] == int(refused.headers["retry-after"])


async def test_budgets_are_edited_through_the_admin_api_and_enforced_at_once(
    gateway: RunningGateway,
) -> None:
    tag = uuid.uuid4().hex[:8]
    rule = {"name": f"api-{tag}", "per": "run", "match": f"api-{tag}", "calls": 1}
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.put(f"/admin/budgets/{rule['name']}", json=rule)).status_code == 200
        listed = {b["rule"]["name"]: b["source"] for b in (await http.get("/admin/budgets")).json()}
        assert listed[rule["name"]] == "api" and listed["burst-run"] == "config"
        conflict = await http.put("/admin/budgets/sdk-run", json=BUDGETS[1] | {"calls": 99})
        assert conflict.status_code == 409
        assert (await http.put("/admin/budgets/other", json=rule)).status_code == 422
        assert (
            await http.put(f"/admin/budgets/{rule['name']}", json={"name": rule["name"]})
        ).status_code == 422

        answers = []
        for n in range(2):
            body, headers = read_item(f"fixture://items/{tag}-{n}", n)
            answers.append(
                (
                    await http.post(
                        "/mcp/modern", json=body, headers=headers | {"agent-run-id": f"api-{tag}"}
                    )
                ).json()
            )
        assert "result" in answers[0] and answers[1]["error"]["data"]["budget"] == rule["name"]

        effective = (
            await http.get("/admin/budgets/effective", params={"subject": "anonymous", "run": f"api-{tag}"})
        ).json()
        assert [(e["budget"], e["used"], e["limit"]) for e in effective] == [(rule["name"], 1, 1)]
        assert (await http.delete(f"/admin/budgets/{rule['name']}")).status_code == 204
        assert (await http.delete(f"/admin/budgets/{rule['name']}")).status_code == 404
        assert (await http.delete("/admin/budgets/burst-run")).status_code == 409


def test_a_local_ledger_belongs_to_one_gateway_process_and_outlives_its_restart(
    tmp_path: Path, modern_upstream: str
) -> None:
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": ["p, anonymous, mcp:modern/*, *, allow", "p, anonymous, admin:budgets, read, allow"]
        },
        "budgets": {"rules": BUDGETS},  # the default store: local
    }
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    run = f"burst-{uuid.uuid4().hex[:8]}"
    for name in ("first", "second", "again"):
        (tmp_path / name).mkdir()
    with run_gateway(tmp_path / "first", config, database_url=database_url) as first:
        for n in range(3):
            body, headers = read_item(f"fixture://items/{run}-{n}", n)
            answer = httpx.post(first.mcp("modern"), json=body, headers=headers | {"agent-run-id": run})
            assert "result" in answer.json()
        with (
            pytest.raises(FixtureStartError, match=r"owns the budget counters of this database") as refused,
            run_gateway(tmp_path / "second", config, database_url=database_url),
        ):
            pass
        assert "budgets.store sql or redis" in str(refused.value)
    with run_gateway(tmp_path / "again", config, database_url=database_url) as again:
        effective = httpx.get(
            f"{again.url}/admin/budgets/effective", params={"subject": "anonymous", "run": run}
        ).json()
    assert [(e["budget"], e["used"]) for e in effective] == [("burst-run", 3)]
