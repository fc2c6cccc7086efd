"""The admin audit API in process: every read first waits for the records this process queued."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from agentgw.admin.audit import audit_router
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog
from tests.storage.test_audit_log import record


async def anyone() -> None:
    return None


async def test_a_reader_sees_an_outcome_queued_before_its_request(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine)
    flushing = anyio.Event()

    async def flush() -> None:
        flushing.set()
        await log.flush()

    app = FastAPI()
    app.include_router(audit_router(engine, anyone, flush=flush))
    answers: dict[str, Any] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:

        async def read() -> None:
            answers["records"] = (await http.get("/admin/audit/records")).json()["records"]

        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # hold the write lock: the outcome cannot be committed yet
            log.submit(record(1, event="outcome"))
            with anyio.fail_after(5):
                async with anyio.create_task_group() as readers:
                    readers.start_soon(read)
                    await flushing.wait()  # the read waits at the barrier; without it, it would find nothing
                    other.execute("ROLLBACK")
        assert [(r["request_id"], r["event"]) for r in answers["records"]] == [("r1", "outcome")]

        log.submit(record(2, event="outcome"))
        exported = (await http.get("/admin/audit/export")).text
        assert '"request_id":"r2"' in exported
        log.submit(record(3, event="outcome"))
        verified = (await http.get("/admin/audit/verify")).json()
        assert verified["ok"] and verified["records"] == 3
    log.close()
    engine.dispose()
