"""Auditors' admin API on a real gateway: who called what, was it allowed, and is the log intact."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support.gateway import RunningGateway, run_gateway

MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": [
                "p, anonymous, mcp:modern/echo, *, allow",
                "p, anonymous, admin:audit, read, allow",
            ]
        },
        "audit": {"redact": {"patterns": [r"\bcase-\d+\b"]}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


async def test_an_auditor_finds_the_allowed_and_the_denied_call_of_a_run(gateway: RunningGateway) -> None:
    run = f"audit-{uuid.uuid4().hex[:8]}"
    secret = "Bearer sk-abcdefghijklmnopqrstuvwx"
    async with (
        httpx.AsyncClient(headers={"Agent-Run-Id": run}) as http,
        Client(streamable_http_client(gateway.mcp("modern"), http_client=http), mode=MODERN) as client,
    ):
        await client.call_tool("echo", {"text": f"about case-42, key {secret}"})
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("add", {"a": 1, "b": 2})
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        tools = {"run_id": run, "resource": "mcp:modern/*"}  # the client's tools/list calls are recorded too
        records = (await http.get("/admin/audit/records", params=tools)).json()["records"]
        denied = (await http.get("/admin/audit/records", params={"run_id": run, "decision": "denied"})).json()
        export = await http.get("/admin/audit/export", params=tools | {"format": "otel"})
        bad = await http.get("/admin/audit/records", params={"since": "last week"})
        verified = (await http.get("/admin/audit/verify")).json()
    assert [(r["event"], r["decision"], r["resource"]) for r in records] == [
        ("decision", "allowed", "mcp:modern/echo"),
        ("outcome", "allowed", "mcp:modern/echo"),
        ("decision", "denied", "mcp:modern/add"),
    ]
    allowed = records[0]
    assert allowed["rule"] == "p, anonymous, mcp:modern/echo, *, allow"
    assert allowed["arguments"] == {"text": "about [REDACTED:pattern], key [REDACTED:bearer]"}
    assert allowed["args_digest"].startswith("sha256:")
    assert secret not in json.dumps(records)
    [refused] = denied["records"]
    assert refused["reason"] == "denied_by_policy" and refused["arguments"] == {"a": 1, "b": 2}
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [line["severityText"] for line in lines] == ["INFO", "INFO", "WARN"]
    assert bad.status_code == 422 and "invalid time" in bad.text
    assert verified["ok"] and verified["problem"] is None
