"""The audit log end to end: a gateway killed with SIGKILL under load has a record of every call the
upstream saw (the "allowed" record is committed before the call is forwarded)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.support.gateway import run_gateway
from tests.support.mcp import META, modern_headers

POLICY = ["p, anonymous, mcp:modern/*, *, allow", "p, anonymous, admin:audit, read, allow"]
WORKERS = 8
KILL_AFTER = 80  # answered calls before the kill; the others are in flight when it lands


def config(upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{upstream}/mcp"}],
        "policy": {"rules": POLICY},
        **extra,
    }


async def read(http: httpx.AsyncClient, url: str, uri: str, msg_id: int) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "resources/read", "params": {"uri": uri, "_meta": META}}
    return await http.post(url, json=body, headers=modern_headers("resources/read", uri))


async def upstream_uris(upstream: str, prefix: str) -> set[str]:
    async with httpx.AsyncClient() as http:
        received = (await http.get(f"{upstream}/_fixture/received")).json()
    return {
        r["uri"] for r in received if r["method"] == "resources/read" and (r["uri"] or "").startswith(prefix)
    }


async def test_every_call_the_upstream_saw_is_in_the_log_after_a_sigkill(
    tmp_path: Path, modern_upstream: str
) -> None:
    prefix = f"fixture://items/{uuid.uuid4().hex[:8]}-"
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    answered = 0
    enough = asyncio.Event()
    with run_gateway(tmp_path, config(modern_upstream), database_url=database_url) as gw:

        async def worker(w: int, http: httpx.AsyncClient) -> None:
            nonlocal answered
            for n in range(10_000):
                try:
                    response = await read(http, gw.mcp("modern"), f"{prefix}{w}-{n}", n)
                except httpx.HTTPError:
                    return  # the gateway is gone
                assert "result" in response.json()
                answered += 1
                if answered >= KILL_AFTER:
                    enough.set()

        async with httpx.AsyncClient(timeout=10) as http:
            workers = [asyncio.create_task(worker(w, http)) for w in range(WORKERS)]
            await asyncio.wait_for(enough.wait(), timeout=60)
            gw.process.process.kill()  # SIGKILL: no shutdown, no flush
            await asyncio.wait_for(asyncio.gather(*workers), timeout=30)
    seen = await upstream_uris(modern_upstream, prefix)
    assert len(seen) >= KILL_AFTER

    with run_gateway(tmp_path, config(modern_upstream), database_url=database_url) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            recorded: set[str] = set()
            after = 0
            while True:
                page = (
                    await http.get(
                        "/admin/audit/records",
                        params={"event": "decision", "decision": "allowed", "limit": 1000, "after": after},
                    )
                ).json()
                recorded |= {r["resource"].removeprefix("mcp:modern/resource/") for r in page["records"]}
                if page["next"] is None:
                    break
                after = page["next"]
            verified = (await http.get("/admin/audit/verify")).json()
    assert seen - recorded == set()
    assert verified["ok"], verified["problem"]
    assert verified["chains"] == 1  # the restarted gateway has written nothing yet
