"""`Mcp-Param-*` headers on bridged 2026-07-28 `tools/call`s: checked against the called tool's schema
(SEP-2243), cold catalog or warm, without a hidden listing and without revealing a tool the caller
may not call."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conformance.fixtures.launch import FIXTURES_DIR, free_port, start_process
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT, META, answer_of, modern_headers

TOOL = "test_x_mcp_header"  # declares `region` with "x-mcp-header": "Region"
LEGACY = "2025-11-25"


@pytest.fixture(scope="module")
def everything() -> Iterator[str]:
    port = free_port()
    args = [sys.executable, str(FIXTURES_DIR / "mcp_everything.py"), "--port", str(port)]
    with start_process(args, port) as process:
        yield f"{process.url}/mcp"


@pytest.fixture
def gateway(tmp_path_factory: pytest.TempPathFactory, everything: str) -> Iterator[RunningGateway]:
    """A fresh gateway per test: its catalog is cold until something lists or calls."""
    config = {
        "allow_anonymous": True,
        # The same upstream twice: policy opens `every` and leaves `shadow` closed (default deny).
        "servers": [
            {"name": "every", "url": everything},
            {"name": "shadow", "url": everything},
            {"name": "down", "url": "http://127.0.0.1:9/mcp", "timeout_s": 1},
        ],
        "list_timeout_s": 1,
        "policy": {
            "rules": [
                "p, anonymous, mcp:every/*, *, allow",
                "p, anonymous, mcp:down/*, *, allow",
                "p, anonymous, admin:audit, read, allow",
            ]
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def call(gateway: RunningGateway, tool: str, arguments: dict[str, Any], **headers: str) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments, "_meta": META},
    }
    return httpx.post(
        gateway.mcp(), json=body, headers=modern_headers("tools/call", tool) | headers, timeout=30
    )


def test_a_mismatched_header_is_refused_on_a_cold_catalog_and_a_matching_one_is_served(
    gateway: RunningGateway,
) -> None:
    refused = call(gateway, f"every__{TOOL}", {"region": "eu"}, **{"mcp-param-region": "us"})
    served = call(gateway, f"every__{TOOL}", {"region": "eu"}, **{"mcp-param-region": "eu"})
    missing = call(gateway, f"every__{TOOL}", {"region": "eu"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == -32020
    assert "Mcp-Param-Region" in refused.json()["error"]["message"]
    assert served.status_code == 200
    assert served.json()["result"]["content"][0]["text"] == "region=eu"
    assert missing.status_code == 400 and missing.json()["error"]["code"] == -32020


def test_a_tool_the_caller_may_not_call_answers_with_the_denial_not_its_header_declaration(
    gateway: RunningGateway,
) -> None:
    # A header-mismatch answer would tell the caller that the tool exists and what it declares.
    response = call(gateway, f"shadow__{TOOL}", {}, **{"mcp-param-region": "us"})
    assert response.json()["error"]["code"] == -32003
    assert "Region" not in response.text


def test_headers_that_cannot_be_checked_are_refused_not_passed(gateway: RunningGateway) -> None:
    # The upstream cannot list its tools, so nothing says what the header should be: fail closed.
    response = call(gateway, "down__pay", {"region": "eu"}, **{"mcp-param-region": "eu"})
    message = response.json()["error"]["message"]
    assert message == "upstream 'down' did not list its tools: the Mcp-Param headers cannot be checked"


def test_a_call_is_audited_once_with_no_listing_record_for_the_header_check(gateway: RunningGateway) -> None:
    run = f"params-{uuid.uuid4().hex[:8]}"
    refused = call(
        gateway, f"every__{TOOL}", {"region": "eu"}, **{"mcp-param-region": "us", "agent-run-id": run}
    )
    served = call(
        gateway, f"every__{TOOL}", {"region": "eu"}, **{"mcp-param-region": "eu", "agent-run-id": run}
    )
    assert (refused.status_code, served.status_code) == (400, 200)
    records = httpx.get(f"{gateway.url}/admin/audit/records", params={"run_id": run}).json()["records"]
    assert [(r["event"], r["resource"], r["reason"]) for r in records] == [
        ("decision", f"mcp:every/{TOOL}", None),
        ("outcome", f"mcp:every/{TOOL}", "header_mismatch"),
        ("decision", f"mcp:every/{TOOL}", None),
        ("outcome", f"mcp:every/{TOOL}", None),
    ]


def legacy_call(gateway: RunningGateway, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A handshake-era client's first tools/call (nothing listed before): the JSON-RPC answer."""
    base = {"accept": ACCEPT, "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    with httpx.Client(base_url=gateway.url, headers=base, timeout=30) as http:
        session = http.post("/mcp", json=init).headers["mcp-session-id"]
        headers = {"mcp-session-id": session, "mcp-protocol-version": LEGACY}
        http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
        response = http.post("/mcp", json=body, headers=headers)
    return answer_of(response)


def test_a_first_call_of_a_tool_that_declares_headers_reaches_the_upstream_with_them(
    gateway: RunningGateway,
) -> None:
    # A handshake-era client sends no Mcp-Param headers, but the 2026-07-28 upstream requires them:
    # the gateway, never having listed the tool, learns its declaration and mirrors the argument.
    answer = legacy_call(gateway, f"every__{TOOL}", {"region": "eu"})
    assert answer["result"]["content"][0]["text"] == "region=eu"
