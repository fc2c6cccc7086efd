"""Discovery on the merged `/mcp` applies the scope check of invocation: a token without a server's
required scopes sees none of its tools, prompts or resources (it could call none of them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, answer_of, modern_headers
from tests.support.tokens import bearer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [
            {"name": "open", "url": f"{modern_upstream}/mcp"},
            # The same upstream again, behind a scope requirement.
            {"name": "scoped", "url": f"{modern_upstream}/mcp", "scopes": ["mcp.admin"]},
        ],
        "policy": {
            "rules": [
                "g, user:alice, role:dev",
                "p, role:dev, mcp:open/*, *, allow",
                "p, role:dev, mcp:scoped/*, *, allow",
            ]
        },
        "auth": {"builtin": {"enabled": True}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def request(gw: RunningGateway, scopes: list[str], method: str, params: dict[str, Any] | None = None) -> Any:
    name = (params or {}).get("name")
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**(params or {}), "_meta": META}}
    headers = modern_headers(method, name) | bearer(gw, "alice", "/mcp", scopes=scopes)
    return httpx.post(gw.mcp(), json=body, headers=headers)


def listed(gw: RunningGateway, scopes: list[str], method: str, key: str, field: str = "name") -> set[str]:
    return {item[field] for item in answer_of(request(gw, scopes, method))["result"][key]}


def servers_of(names: set[str], separator: str) -> set[str]:
    return {name.split(separator, 1)[0] for name in names}


def test_a_token_without_a_servers_scopes_discovers_none_of_its_items(gateway: RunningGateway) -> None:
    assert servers_of(listed(gateway, [], "tools/list", "tools"), "__") == {"open"}
    assert servers_of(listed(gateway, [], "prompts/list", "prompts"), "__") == {"open"}
    assert servers_of(listed(gateway, [], "resources/list", "resources", "uri"), "+") == {"open"}
    # As invocation refuses them.
    refused = request(gateway, [], "tools/call", {"name": "scoped__echo", "arguments": {"text": "x"}})
    assert "insufficient scope" in answer_of(refused)["error"]["message"]


def test_a_token_with_the_scopes_discovers_and_calls_them(gateway: RunningGateway) -> None:
    tools = listed(gateway, ["mcp.admin"], "tools/list", "tools")
    assert servers_of(tools, "__") == {"open", "scoped"}
    called = request(
        gateway, ["mcp.admin"], "tools/call", {"name": "scoped__echo", "arguments": {"text": "x"}}
    )
    assert answer_of(called)["result"]["content"][0]["text"] == "x"
