"""Prometheus metrics end to end: real calls through a real gateway process with the official MCP SDK
client, then `/metrics` scraped and parsed with `prometheus_client`'s own parser."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from conformance.fixtures.launch import free_port
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, MODERN, modern_headers
from tests.support.tokens import bearer

UPSTREAM_SECRET = "metrics-upstream-key-5d1e"
STAGES = {"audit", "authenticate", "authorize", "budget", "credentials", "admitted", "upstream"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def gateway_config(tmp_path: Path, modern_upstream: str, **extra: object) -> dict[str, object]:
    key = tmp_path / "upstream.key"
    key.write_text(UPSTREAM_SECRET)
    return {
        "servers": [
            {
                "name": "modern",
                "url": f"{modern_upstream}/mcp",
                "credential": {"mode": "static", "secret": "upstream-key"},
            }
        ],
        "secrets": {"upstream-key": {"file": str(key)}},
        "policy": {
            "rules": [
                "p, user:alice, mcp:modern/*, *, allow",
                "p, user:alice, mcp:modern/add, call, deny",
                "p, user:ops, admin:metrics, read, allow",
            ]
        },
        "budgets": {"rules": [{"name": "one-echo", "per": "run", "match": "m-*", "calls": 1}]},
        **extra,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gw")
    with run_gateway(tmp, gateway_config(tmp, modern_upstream)) as gw:
        yield gw


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


async def drive(gw: RunningGateway) -> None:
    """One allowed tools/call, one denied by policy, one refused by the run's budget."""
    headers = bearer(gw, "alice", "/mcp/modern") | {"agent-run-id": f"m-{uuid.uuid4().hex[:8]}"}
    async with (
        httpx.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(gw.mcp("modern"), http_client=http), mode=MODERN) as client,
    ):
        assert not (await client.call_tool("echo", {"text": "hi"})).is_error
        with pytest.raises(MCPError) as denied:
            await client.call_tool("add", {"a": 1, "b": 2})
        assert denied.value.code == -32003
        with pytest.raises(MCPError) as refused:
            await client.call_tool("echo", {"text": "one too many"})
        assert refused.value.code == -32029


def scrape(gw: RunningGateway, who: str | None = "ops") -> httpx.Response:
    headers = bearer(gw, who, "/admin") if who else {}
    return httpx.get(f"{gw.url}/metrics", headers=headers)


async def test_metrics_count_an_allowed_a_denied_and_a_budget_refused_call(gateway: RunningGateway) -> None:
    await drive(gateway)
    # A name no registry entry holds, chosen by the caller, is never a label value.
    made_up = f"made-up-{uuid.uuid4().hex[:8]}"
    assert httpx.post(gateway.mcp(made_up), json={}).status_code == 401
    response = scrape(gateway)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    scraped = samples(response.text)
    calls = "agentgw_calls_total"
    mcp = {"protocol": "mcp", "action": "call", "upstream": "modern"}
    assert value(scraped, calls, **mcp, decision="allowed", reason="ok") == 1
    assert value(scraped, calls, **mcp, decision="denied", reason="denied_by_policy") == 1
    assert value(scraped, calls, **mcp, decision="denied", reason="budget_exceeded") == 1
    assert (
        value(
            scraped,
            calls,
            protocol="mcp",
            action="session",
            upstream="unknown",
            decision="denied",
            reason="unauthenticated",
        )
        == 1
    )
    assert made_up not in response.text
    assert value(scraped, "agentgw_budget_refusals_total", budget="one-echo", metric="calls") == 1
    # Every stage is timed; the upstream for each forwarded call (the allowed tools/call at least).
    stage_counts = {
        dict(labels)["stage"]: count
        for (name, labels), count in scraped.items()
        if name == "agentgw_stage_duration_seconds_count"
    }
    assert set(stage_counts) == STAGES
    assert all(count >= 1 for count in stage_counts.values())
    # The denied and the refused call stopped before the upstream: it saw fewer calls than the audit stage.
    assert stage_counts["upstream"] <= stage_counts["audit"] - 2
    upstream_count = value(
        scraped, "agentgw_upstream_duration_seconds_count", protocol="mcp", upstream="modern"
    )
    assert upstream_count is not None and upstream_count >= 1
    inf_bucket = value(
        scraped, "agentgw_upstream_duration_seconds_bucket", protocol="mcp", upstream="modern", le="+Inf"
    )
    assert inf_bucket == upstream_count
    assert value(scraped, "agentgw_upstream_up", target="upstream 'modern'") == 1
    # The static credential is looked up once per forwarded call: the first misses, the rest hit.
    assert value(scraped, "agentgw_token_cache_lookups_total", upstream="modern", result="miss") == 1
    assert value(scraped, "agentgw_audit_journal_backlog") is not None
    assert value(scraped, "agentgw_audit_refusing") == 0
    # The client library's default collectors.
    assert any(name == "process_cpu_seconds_total" for name, _ in scraped)
    assert any(name == "python_info" for name, _ in scraped)
    # No principal label unless asked for.
    assert "alice" not in response.text


def test_metrics_without_credentials_are_refused_with_401(gateway: RunningGateway) -> None:
    response = scrape(gateway, None)
    assert response.status_code == 401
    assert "agentgw_calls" not in response.text


def test_metrics_without_the_admin_metrics_grant_are_refused_with_403(gateway: RunningGateway) -> None:
    response = scrape(gateway, "alice")
    assert response.status_code == 403
    assert "agentgw_calls" not in response.text


def test_the_metrics_port_serves_metrics_without_credentials_on_loopback(
    tmp_path: Path, modern_upstream: str
) -> None:
    port = free_port()
    config = gateway_config(tmp_path, modern_upstream, metrics={"port": port, "principal_labels": True})
    with run_gateway(tmp_path, config) as gw:
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
        headers = modern_headers("tools/list") | bearer(gw, "alice", "/mcp/modern")
        assert httpx.post(gw.mcp("modern"), json=listing, headers=headers).status_code == 200
        response = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        scraped = samples(response.text)
        listed = {
            "protocol": "mcp",
            "action": "list",
            "upstream": "modern",
            "decision": "allowed",
            "reason": "ok",
        }
        assert value(scraped, "agentgw_calls_total", **listed, principal="user:alice") == 1
        # The gateway's own port still asks for the grant.
        assert httpx.get(f"{gw.url}/metrics").status_code == 401
