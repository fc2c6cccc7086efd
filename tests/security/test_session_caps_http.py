"""Legacy MCP sessions over HTTP are capped per principal and in total, on the pass-through and the
bridge alike, with a clear error; a refused session leaves nothing behind, upstream included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT
from tests.support.tokens import bearer

LEGACY = {"accept": ACCEPT, "mcp-protocol-version": "2025-11-25"}
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


def config(legacy_upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "servers": [{"name": "legacy", "url": f"{legacy_upstream}/mcp"}],
        "policy": {
            "rules": [
                "g, user:alice, role:dev",
                "g, user:bob, role:dev",
                "p, role:dev, mcp:legacy/*, *, allow",
            ]
        },
        "auth": {"builtin": {"enabled": True}},
        "max_sessions_per_principal": 2,
        "max_sessions": 3,
        **extra,
    }


@pytest.fixture
def gateway(tmp_path: Path, legacy_upstream: str) -> Iterator[RunningGateway]:
    with run_gateway(tmp_path, config(legacy_upstream)) as gw:
        yield gw


def initialize(gw: RunningGateway, path: str, who: str) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=INIT, headers=LEGACY | bearer(gw, who, path))


def upstream_deletes(upstream: str) -> int:
    received = httpx.get(f"{upstream}/_fixture/received").json()
    return sum(1 for r in received if r["http_method"] == "DELETE")


def test_by_default_a_principal_may_hold_a_hundred_sessions(tmp_path: Path, legacy_upstream: str) -> None:
    defaults = {k: v for k, v in config(legacy_upstream).items() if not k.startswith("max_sessions")}
    with run_gateway(tmp_path, defaults) as gw, httpx.Client() as http:
        headers = LEGACY | bearer(gw, "alice", "/mcp/legacy")
        opened = [http.post(gw.mcp("legacy"), json=INIT, headers=headers).status_code for _ in range(101)]
    assert opened == [200] * 100 + [429]


@pytest.mark.parametrize("path", ["/mcp/legacy", "/mcp"])  # pass-through, bridge
def test_sessions_are_capped_per_principal_and_in_all(
    gateway: RunningGateway, legacy_upstream: str, path: str
) -> None:
    httpx.post(f"{legacy_upstream}/_fixture/reset")
    first = initialize(gateway, path, "alice")
    assert first.status_code == 200
    assert initialize(gateway, path, "alice").status_code == 200
    refused = initialize(gateway, path, "alice")
    assert refused.status_code == 429
    assert "too many open sessions" in refused.json()["error"]["message"]
    if path == "/mcp/legacy":
        # The upstream's session that nobody can use was ended there too.
        assert upstream_deletes(legacy_upstream) == 1
    assert initialize(gateway, path, "bob").status_code == 200
    full = initialize(gateway, path, "bob")
    assert full.status_code == 503  # from the bindings, or on the bridge the SDK's own cap (the same)
    assert "sessions" in full.json()["error"]["message"]
    # Ending a session frees its place.
    ended = httpx.delete(
        f"{gateway.url}{path}",
        headers=LEGACY | bearer(gateway, "alice", path) | {"mcp-session-id": first.headers["mcp-session-id"]},
    )
    assert ended.status_code == 200
    assert initialize(gateway, path, "alice").status_code == 200
