"""A legacy session of a bridged endpoint (`/mcp`, a virtual server, stdio and legacy-SSE upstreams)
belongs to the principal that opened it: anyone else holding its id (session ids are in the audit
records auditors read) cannot list with it, take its notification stream, or end it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conformance.fixtures.launch import stdio_command
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT, answer_of
from tests.support.tokens import bearer

LEGACY = "2025-11-25"
HEADERS = {"accept": ACCEPT, "mcp-protocol-version": LEGACY}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
# The bridged endpoints, by path: merged, virtual, stdio, legacy SSE.
BRIDGED = ["/mcp", "/mcp/mixed", "/mcp/local", "/mcp/old-sse"]
POLICY = [
    "g, user:alice, role:dev",
    "g, user:mallory, role:dev",
    "p, role:dev, mcp:local/*, *, allow",
    "p, role:dev, mcp:old-sse/*, *, allow",
]


def config(sse_upstream: str, **extra: Any) -> dict[str, Any]:
    command, args = stdio_command()
    return {
        "servers": [
            {"name": "local", "transport": "stdio", "command": command, "args": args},
            {"name": "old-sse", "transport": "sse", "url": f"{sse_upstream}/sse"},
        ],
        "virtual_servers": [{"name": "mixed", "tools": ["local/add", "old-sse/echo"]}],
        "policy": {"rules": POLICY},
        "auth": {"builtin": {"enabled": True}},
        **extra,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sse_upstream: str) -> Iterator[RunningGateway]:
    with run_gateway(tmp_path_factory.mktemp("gw"), config(sse_upstream)) as gw:
        yield gw


def open_session(gw: RunningGateway, path: str, who: str) -> str:
    auth = bearer(gw, who, path)
    started = httpx.post(f"{gw.url}{path}", json=INIT, headers=HEADERS | auth)
    assert started.status_code == 200, started.text
    session = started.headers["mcp-session-id"]
    ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    done = httpx.post(f"{gw.url}{path}", json=ready, headers=HEADERS | auth | {"mcp-session-id": session})
    assert done.status_code == 202, done.text
    return session


def with_session(gw: RunningGateway, path: str, who: str, session: str) -> dict[str, str]:
    return HEADERS | bearer(gw, who, path) | {"mcp-session-id": session}


def stream_status(gw: RunningGateway, path: str, headers: dict[str, str]) -> int:
    """The status of a GET for the session's notification stream (the stream is closed at once)."""
    with httpx.stream(
        "GET", f"{gw.url}{path}", headers=headers | {"accept": "text/event-stream"}, timeout=10
    ) as response:
        return response.status_code


@pytest.mark.parametrize("path", BRIDGED)
def test_another_principal_cannot_list_listen_or_end_with_a_session_id(
    gateway: RunningGateway, path: str
) -> None:
    session = open_session(gateway, path, "alice")
    mallory = with_session(gateway, path, "mallory", session)
    url = f"{gateway.url}{path}"

    assert httpx.post(url, json=LIST, headers=mallory).status_code == 404
    assert stream_status(gateway, path, mallory) == 404
    assert httpx.delete(url, headers=mallory).status_code == 404

    alice = with_session(gateway, path, "alice", session)
    assert answer_of(httpx.post(url, json=LIST, headers=alice))["result"]["tools"]
    # The owner's stream is still hers to open (a taken one answers 409).
    assert stream_status(gateway, path, alice) == 200
    assert httpx.delete(url, headers=alice).status_code == 200
    assert httpx.post(url, json=LIST, headers=alice).status_code == 404


def test_a_session_belongs_to_the_endpoint_that_opened_it(gateway: RunningGateway) -> None:
    session = open_session(gateway, "/mcp", "alice")
    elsewhere = with_session(gateway, "/mcp/mixed", "alice", session)
    assert httpx.post(f"{gateway.url}/mcp/mixed", json=LIST, headers=elsewhere).status_code == 404
    here = with_session(gateway, "/mcp", "alice", session)
    assert httpx.post(f"{gateway.url}/mcp", json=LIST, headers=here).status_code == 200


def test_with_shared_sessions_no_node_lets_another_principal_use_a_bridged_session(
    tmp_path: Path, sse_upstream: str
) -> None:
    shared = config(sse_upstream, redis_url="redis://127.0.0.1:6379/0")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        run_gateway(tmp_path / "a", shared) as node_a,
        run_gateway(tmp_path / "b", shared) as node_b,
    ):
        session = open_session(node_a, "/mcp", "alice")
        for node in (node_a, node_b):
            mallory = with_session(node, "/mcp", "mallory", session)
            assert httpx.post(node.mcp(), json=LIST, headers=mallory).status_code == 404
            assert stream_status(node, "/mcp", mallory) == 404
            assert httpx.delete(node.mcp(), headers=mallory).status_code == 404
        alice = with_session(node_a, "/mcp", "alice", session)
        assert answer_of(httpx.post(node_a.mcp(), json=LIST, headers=alice))["result"]["tools"]
