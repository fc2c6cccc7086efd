"""`/readyz` says whether the gateway can serve calls (its stores), and what its upstreams last did;
`/healthz` only says the process answers. Faults go through a TCP proxy to the machine's Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

from tests.support.gateway import run_gateway
from tests.support.mcp import META, modern_headers
from tests.support.proxy import TcpProxy
from tests.support.servers import unused_url

WAIT_S = 15.0


async def readyz_until(url: str, ready: Callable[[httpx.Response], bool]) -> httpx.Response:
    """`/readyz` once `ready(answer)` holds (its store probes are cached for two seconds)."""
    response = None
    with anyio.fail_after(WAIT_S):
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                response = await http.get(f"{url}/readyz")
                if ready(response):
                    return response
                await anyio.sleep(0.1)  # polling another process: no event to wait on


async def test_readyz_follows_the_budget_store_while_healthz_stays_live(tmp_path: Path) -> None:
    down = unused_url()
    with TcpProxy(6379) as redis:
        config: dict[str, Any] = {
            "allow_anonymous": True,
            "servers": [{"name": "down", "url": f"{down}/mcp", "timeout_s": 2}],
            "policy": {"rules": ["p, anonymous, mcp:*, *, allow"]},
            "budgets": {
                "store": "redis",
                "redis_url": f"redis://127.0.0.1:{redis.port}/0",
                "redis_prefix": f"agentgw-test-{uuid.uuid4().hex}:",
            },
        }
        with run_gateway(tmp_path, config) as gw:
            ready = await readyz_until(gw.url, lambda r: r.status_code == 200)
            assert ready.json()["status"] == "ready"
            assert ready.json()["stores"] == {
                "policy": {"ok": True},
                "budget_store": {"ok": True},
                "audit_log": {"ok": True},
            }
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "t", "arguments": {}, "_meta": META},
            }
            async with httpx.AsyncClient(timeout=10) as http:
                failed = await http.post(gw.mcp("down"), json=body, headers=modern_headers("tools/call", "t"))
            assert "unreachable" in failed.json()["error"]["message"]
            redis.refuse()  # every connection reset, new ones refused
            refused = await readyz_until(gw.url, lambda r: r.status_code == 503)
            assert refused.json()["status"] == "not_ready"
            assert refused.json()["stores"]["budget_store"]["ok"] is False
            assert refused.json()["stores"]["budget_store"]["reason"]
            assert refused.json()["upstreams"]["upstream 'down'"]["ok"] is False, "known from the failed call"
            assert refused.json()["upstreams"]["upstream 'down'"]["reason"] == "unreachable"
            assert httpx.get(f"{gw.url}/healthz").status_code == 200, "liveness asks no store"
            redis.resume()
            await readyz_until(gw.url, lambda r: r.status_code == 200)
