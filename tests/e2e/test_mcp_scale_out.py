"""Two gateway nodes sharing Redis: a legacy session started on one continues on the other."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from mcp import Client

from tests.support.gateway import run_gateway

REDIS = "redis://127.0.0.1:6379/0"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
HEADERS = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}


def config(upstream: str) -> dict[str, object]:
    return {
        "allow_anonymous": True,
        "redis_url": REDIS,
        "servers": [{"name": "legacy", "url": f"{upstream}/mcp"}],
        "policy": {"rules": ["p, anonymous, mcp:legacy/*, *, allow"]},
    }


def test_a_session_started_on_one_node_continues_on_another(tmp_path: Path, legacy_upstream: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        run_gateway(tmp_path / "a", config(legacy_upstream)) as node_a,
        run_gateway(tmp_path / "b", config(legacy_upstream)) as node_b,
    ):
        started = httpx.post(node_a.mcp("legacy"), json=INIT, headers=HEADERS)
        assert started.status_code == 200
        session = started.headers["mcp-session-id"]
        headers = HEADERS | {"mcp-session-id": session}
        assert (
            httpx.post(
                node_b.mcp("legacy"),
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=headers,
            ).status_code
            == 202
        )
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "b"}},
        }
        answer = httpx.post(node_b.mcp("legacy"), json=call, headers=headers)
        assert answer.status_code == 200 and '"b"' in answer.text
        # A session id nobody minted is unknown on every node.
        forged = HEADERS | {"mcp-session-id": uuid.uuid4().hex}
        assert httpx.post(node_b.mcp("legacy"), json=call, headers=forged).status_code == 404


async def test_the_sdk_client_works_against_a_redis_backed_node(tmp_path: Path, legacy_upstream: str) -> None:
    with run_gateway(tmp_path, config(legacy_upstream)) as node:
        async with Client(node.mcp("legacy"), mode="legacy") as client:
            result = await client.call_tool("echo", {"text": "r"})
            assert result.content[0].text == "r"  # type: ignore[union-attr]


def test_an_unreachable_session_store_refuses_the_call(tmp_path: Path, legacy_upstream: str) -> None:
    broken = config(legacy_upstream) | {"redis_url": "redis://127.0.0.1:1/0"}
    with run_gateway(tmp_path, broken) as node:
        response = httpx.post(node.mcp("legacy"), json=INIT, headers=HEADERS)
        assert response.json()["error"]["message"] == "the session store is unreachable"


@pytest.fixture(autouse=True)
def _redis_is_there() -> None:
    import redis

    redis.Redis.from_url(REDIS).ping()  # the machine runs Redis; fail loudly if it does not
