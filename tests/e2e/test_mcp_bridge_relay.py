"""What the bridge (`/mcp`, virtual servers) relays between a 2026-07-28 client and its upstream:
the client's own declared capabilities, and the upstream's error data with the names the client
was shown."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conformance.fixtures.launch import FIXTURES_DIR, free_port, start_process
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, modern_headers

MISSING_CAPABILITY = -32021
MISSING_URI = "test://nonexistent-resource-for-conformance-testing"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    port = free_port()
    args = [sys.executable, str(FIXTURES_DIR / "mcp_everything.py"), "--port", str(port)]
    with start_process(args, port) as process:
        config = {
            "allow_anonymous": True,
            "servers": [{"name": "every", "url": f"{process.url}/mcp"}],
            "policy": {"rules": ["p, anonymous, mcp:every/*, *, allow"]},
        }
        with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
            yield gw


def post(gateway: RunningGateway, method: str, params: dict[str, Any], name: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    return httpx.post(gateway.mcp(), json=body, headers=modern_headers(method, name), timeout=30)


def test_the_upstream_sees_the_clients_capabilities_not_the_gateways(gateway: RunningGateway) -> None:
    # META declares no capability: the upstream must refuse a tool that needs sampling, not ask the
    # client for a sample it cannot give because the gateway declared sampling for it.
    answer = post(
        gateway,
        "tools/call",
        {"name": "every__test_missing_capability", "arguments": {}},
        "every__test_missing_capability",
    )
    error = answer.json()["error"]
    assert error["code"] == MISSING_CAPABILITY, error
    assert "sampling" in error["data"]["requiredCapabilities"]


def test_an_upstream_error_keeps_its_data_with_the_uri_the_client_asked_for(gateway: RunningGateway) -> None:
    uri = f"every+{MISSING_URI}"
    answer = post(gateway, "resources/read", {"uri": uri}, uri)
    error = answer.json()["error"]
    assert error["data"]["uri"] == uri, error
