"""The default budget store (the local ledger) end to end: it does not refuse calls under load it can
carry, and a crash never resets a run.

A real gateway process on SQLite with the audit log on (its ingest thread and the ledger's save
thread share the database's write lock), in front of the benchmark's fast upstream or the modern
fixture.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery, query
from bench.compare import upstream_args
from bench.load import run, workload
from conformance.fixtures.launch import free_port, start_process
from tests.support.gateway import run_gateway
from tests.support.mcp import META, modern_headers

CALLS = 4000
CONCURRENCY = 50


@pytest.fixture(scope="module")
def fast_upstream() -> Iterator[str]:
    port = free_port()
    with start_process(upstream_args("fast", port), port) as process:
        yield process.url


async def test_the_local_ledger_refuses_nothing_at_c50_with_the_audit_log_on(
    tmp_path: Path, fast_upstream: str
) -> None:
    # A short save interval makes the fail-closed bound short (5 intervals): lock waits that would
    # have to last seconds at the default interval refuse calls here within a few thousand calls.
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "bench", "url": f"{fast_upstream}/mcp"}],
        "policy": {"rules": ["p, anonymous, mcp:bench/*, *, allow"]},
        "budgets": {
            "store": "local",
            "flush_s": 0.02,
            "rules": [{"name": "rate", "per": "subject", "window": "day", "calls": 1_000_000_000}],
        },
    }
    with run_gateway(tmp_path, config) as gw:
        result = await run(workload("mcp", gw.mcp("bench")), CALLS, CONCURRENCY)
        output = gw.output()
    assert result.calls == CALLS
    assert result.errors == 0, result.first_error
    assert "budget store unavailable" not in output


def read_item(uri: str, msg_id: int) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "resources/read", "params": {"uri": uri, "_meta": META}}
    return body, modern_headers("resources/read", uri)


async def test_a_crash_never_resets_a_run(tmp_path: Path, modern_upstream: str) -> None:
    # Saved once a minute: when the gateway is killed, nothing it counted has been saved.
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": ["p, anonymous, mcp:modern/*, *, allow", "p, anonymous, admin:budgets, read, allow"]
        },
        "budgets": {"flush_s": 60, "rules": [{"name": "long-run", "per": "run", "calls": 1000}]},
    }
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    run_id = f"crash-{uuid.uuid4().hex[:8]}"
    for name in ("first", "again"):
        (tmp_path / name).mkdir()
    with run_gateway(tmp_path / "first", config, database_url=database_url) as first:
        async with httpx.AsyncClient(timeout=30) as http:

            async def one(n: int) -> bool:
                body, headers = read_item(f"fixture://items/{run_id}-{n}", n)
                response = await http.post(
                    first.mcp("modern"), json=body, headers=headers | {"agent-run-id": run_id}
                )
                return "result" in response.json()

            answered = sum(await asyncio.gather(*(one(n) for n in range(40))))
        first.process.process.send_signal(signal.SIGKILL)
        first.process.process.wait(10)
    assert answered == 40
    with run_gateway(tmp_path / "again", config, database_url=database_url) as again:
        effective = httpx.get(
            f"{again.url}/admin/budgets/effective", params={"subject": "anonymous", "run": run_id}
        ).json()
        output = again.output()
    engine = make_engine(database_url)
    decisions = query(engine, AuditQuery(run_id=run_id, event="decision", decision="allowed"), limit=1000)
    engine.dispose()
    assert len(decisions) == answered, "every answered call has its durable decision record"
    [(budget, used)] = [(e["budget"], e["used"]) for e in effective]
    assert budget == "long-run" and used >= len(decisions)
    assert "recounted from the audit log" in output
