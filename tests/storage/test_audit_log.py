"""The SQL audit log: group commit, one hash chain per writer, verify against tampering, queries, export."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from agentgw.errors import Unavailable
from agentgw.filters.audit import AuditRecord, AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit_log import (
    GENESIS,
    LINGER_S,
    AuditQuery,
    SqlAuditLog,
    audit_chain,
    audit_log,
    otel_record,
    parse_time,
    prune,
    query,
    record_hash,
    verify,
)
from agentgw.storage.audit_log import _row as stored_row  # the exact bytes a record is hashed from

BASE = AuditRecord(
    time="2026-01-01T12:00:00.000000Z",
    event="decision",
    request_id="r0",
    protocol="mcp",
    action="call",
    resource="mcp:github/create_issue",
    method="tools/call",
    upstream="github",
    decision="allowed",
    subject="user:alice",
    client_id="ci-bot",
    actors=("client:planner",),
    run_id="run-1",
    args_digest="sha256:" + "0" * 64,
    arguments='{"title":"x"}',
)


# Computed with the code before decision 0207 (dataclasses.asdict, lists dumped as lists).
HASH_OF_RECORD_1 = "3dbc03a6e07d3591badc3e5b4cc7beb6606379ac9c3f291d33f897a24035ea80"


def record(n: int, **changes: Any) -> AuditRecord:
    return replace(BASE, request_id=f"r{n}", **changes)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    built = make_engine(url)
    with built.begin() as conn:  # the PostgreSQL database lives for the session: start clean
        for table in (audit_log, audit_chain):
            if built.dialect.has_table(conn, table.name):
                conn.execute(delete(table))
    yield built
    built.dispose()


async def write_all(log: SqlAuditLog, records: list[AuditRecord]) -> None:
    await asyncio.gather(*(log.write(r) for r in records))


async def test_concurrent_records_are_committed_in_groups_and_verify(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node-a"))
    await write_all(log, [record(n) for n in range(200)])
    log.close()
    assert log.commits < 100
    report = verify(engine)
    assert report.ok, report.problem
    assert report.records == 200 and report.chains == 1


async def test_two_writers_keep_two_chains_in_one_table(engine: Engine) -> None:
    first = SqlAuditLog(engine, AuditSettings(node_id="node-a"))
    second = SqlAuditLog(engine, AuditSettings(node_id="node-b"))
    await asyncio.gather(
        write_all(first, [record(n) for n in range(50)]), write_all(second, [record(n) for n in range(50)])
    )
    first.close()
    second.close()
    report = verify(engine)
    assert report.ok, report.problem
    assert (report.records, report.chains) == (100, 2)
    assert first.chain.startswith("node-a:") and second.chain.startswith("node-b:")


async def chain_of(engine: Engine, count: int) -> tuple[SqlAuditLog, list[int]]:
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    for n in range(count):
        await log.write(record(n))
    log.close()
    with engine.connect() as conn:
        ids = list(conn.execute(select(audit_log.c.id).order_by(audit_log.c.seq)).scalars())
    return log, ids


async def test_an_edited_record_is_named(engine: Engine) -> None:
    _, ids = await chain_of(engine, 5)
    with engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.id == ids[2]).values(decision="denied"))
    problem = verify(engine).problem
    assert problem is not None and problem.kind == "edited" and problem.record_id == ids[2]
    assert f"record {ids[2]}" in problem.message


async def test_a_removed_record_is_named_by_its_successor(engine: Engine) -> None:
    _, ids = await chain_of(engine, 5)
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.id == ids[1]))
    problem = verify(engine).problem
    assert problem is not None and problem.kind == "removed"
    assert problem.record_id == ids[2] and problem.seq == 3
    assert "seq 2" in problem.message


async def test_removing_the_newest_records_is_detected(engine: Engine) -> None:
    _, ids = await chain_of(engine, 5)
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.id.in_(ids[3:])))
    problem = verify(engine).problem
    assert problem is not None and problem.kind == "removed" and "seq 4 to 5" in problem.message


async def test_a_record_inserted_into_a_chain_is_named(engine: Engine) -> None:
    _, ids = await chain_of(engine, 3)
    with engine.connect() as conn:
        row = dict(conn.execute(select(audit_log).where(audit_log.c.id == ids[1])).one()._mapping)
    forged = row | {"seq": 4, "request_id": "forged", "prev_hash": row["hash"]}
    del forged["id"]
    with engine.begin() as conn:
        inserted = conn.execute(insert(audit_log).values(**forged)).inserted_primary_key[0]
    problem = verify(engine).problem
    assert problem is not None and problem.kind == "inserted" and problem.record_id == inserted


async def test_a_record_of_a_chain_nobody_started_is_named(engine: Engine) -> None:
    _, ids = await chain_of(engine, 2)
    with engine.connect() as conn:
        row = dict(conn.execute(select(audit_log).where(audit_log.c.id == ids[0])).one()._mapping)
    del row["id"]
    with engine.begin() as conn:
        inserted = conn.execute(
            insert(audit_log).values(**(row | {"chain": "a-forger:1"}))
        ).inserted_primary_key[0]
    problem = verify(engine).problem
    assert problem is not None and problem.kind == "inserted" and problem.record_id == inserted


async def test_retention_prunes_old_records_and_the_chain_still_verifies(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    for n in range(4):
        await log.write(record(n, time=f"2025-06-0{n + 1}T00:00:00.000000Z"))
    for n in range(4, 6):
        await log.write(record(n, time="2026-01-01T00:00:00.000000Z"))
    log.close()
    assert prune(engine, "2025-12-01T00:00:00.000000Z") == 4
    report = verify(engine)
    assert report.ok, report.problem
    assert report.records == 2
    # Pruning again finds nothing; removing one more by hand is still caught.
    assert prune(engine, "2025-12-01T00:00:00.000000Z") == 0
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.request_id == "r4"))
    assert verify(engine).problem is not None


async def test_an_unwritable_database_fails_every_waiter_and_the_chain_does_not_advance(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    SqlAuditLog(make_engine(f"sqlite:///{path}")).close()  # the tables exist
    engine = make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    log = SqlAuditLog(engine)
    results = await asyncio.gather(*(log.write(record(n)) for n in range(5)), return_exceptions=True)
    log.close()
    engine.dispose()
    assert all(isinstance(r, Unavailable) for r in results)
    assert "audit log unavailable" in str(results[0])
    assert log.commits == 0


async def test_a_closed_log_refuses_records(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    log = SqlAuditLog(engine)
    log.submit(record(0))
    log.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await log.write(record(1))
    with pytest.raises(Unavailable, match="shutting down"):
        log.submit(record(2))
    with anyio.fail_after(1):
        await log.flush()  # nothing can be queued any more: it has nothing to wait for
    assert [r["request_id"] for r in query(engine, AuditQuery())] == ["r0"]  # close committed it
    engine.dispose()


async def test_flush_returns_once_every_submitted_record_is_committed(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node", batch_max=7))
    with anyio.fail_after(1):
        await log.flush()  # nothing queued yet
    for n in range(50):
        log.submit(record(n))
    with anyio.fail_after(10):
        await log.flush()
    assert [r["request_id"] for r in query(engine, AuditQuery())] == [f"r{n}" for n in range(50)]
    assert verify(engine).ok
    log.close()


async def test_a_submitted_record_that_cannot_be_written_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    SqlAuditLog(make_engine(f"sqlite:///{path}")).close()  # the tables exist
    engine = make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    log = SqlAuditLog(engine)
    log.submit(record(7, event="outcome"))
    with anyio.fail_after(10):
        await log.flush()
    log.close()
    engine.dispose()
    assert "audit record not written: outcome allowed r7 mcp:github/create_issue" in caplog.text


async def cross_thread_wakes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the audit log asks the running loop to do from another thread (`call_soon_threadsafe`)."""
    loop = asyncio.get_running_loop()
    wakes: list[Any] = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        if callback.__module__ == SqlAuditLog.__module__:
            wakes.append(args)
        return call_soon_threadsafe(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    return wakes


async def test_the_writer_wakes_each_event_loop_once_per_batch(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes = await cross_thread_wakes(monkeypatch)
    # durability power: SQLite commits in the writer thread too (with crash, on the loop: below)
    log = SqlAuditLog(engine, AuditSettings(node_id="node", durability="power"))
    await write_all(log, [record(n) for n in range(100)])
    log.close()
    assert len(wakes) == log.commits < 100
    assert sum(len(settled) for (settled,) in wakes) == 100


async def test_sqlite_commits_on_the_event_loop_without_a_thread_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes = await cross_thread_wakes(monkeypatch)
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    await write_all(log, [record(n) for n in range(2, 12)])
    log.close()
    assert wakes == [] and log.commits == 2
    assert verify(engine).ok and verify(engine).records == 11


async def test_a_held_write_lock_sends_records_to_the_writer_thread_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    await log.write(record(1))  # the loop's own connection is set up, the chain started
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (a prune, the budget ledger) holds the lock
    second = asyncio.create_task(log.write(record(2)))
    await asyncio.sleep(0)  # the task queues its record
    log.submit(record(3, event="outcome"))
    third = asyncio.create_task(log.write(record(4)))
    # The event loop is not blocked by the lock: other work goes on while the records wait.
    await asyncio.wait_for(asyncio.sleep(0.05), 1)
    assert not second.done() and not third.done()
    other.execute("ROLLBACK")
    with anyio.fail_after(10):
        await asyncio.gather(second, third)
    await log.write(record(5))  # the thread has caught up: back on the loop, after the others
    log.close()
    other.close()
    assert [r["request_id"] for r in query(engine, AuditQuery())] == ["r1", "r2", "r3", "r4", "r5"]
    assert verify(engine).ok


async def test_an_outcome_nobody_waits_for_shares_the_next_decisions_commit(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    before = log.commits
    log.submit(record(2, event="outcome"))
    await asyncio.sleep(0)  # a turn of the loop: the outcome alone does not wake the writer
    await log.write(record(3))
    assert log.commits == before + 1
    log.close()
    assert [r["request_id"] for r in query(engine, AuditQuery())] == ["r1", "r2", "r3"]


async def test_a_lone_outcome_is_committed_once_its_linger_is_over(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    log.submit(record(1, event="outcome"))
    with anyio.fail_after(5):  # committed by the linger's timer, in the writer thread: poll for it
        while True:
            if query(engine, AuditQuery(request_id="r1")):
                break
            await anyio.sleep(LINGER_S / 5)
    log.close()


def test_a_records_hash_is_the_same_as_ever() -> None:
    # Pinned: the chain of every existing log depends on these bytes (columns, JSON, lists as arrays).
    row = stored_row(record(1, roles=("role:a", "role:b"), latency_ms=1.5, tokens=3, cost=0.25))
    row |= {"chain": "node:abc", "seq": 1, "prev_hash": GENESIS}
    assert row["roles"] == '["role:a","role:b"]' and row["scopes"] == "[]"
    assert record_hash(row) == HASH_OF_RECORD_1


async def test_queries_filter_by_every_auditor_question(engine: Engine) -> None:
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    await log.write(record(1, time="2026-01-01T10:00:00.000000Z"))
    await log.write(record(2, time="2026-01-02T10:00:00.000000Z", subject="user:bob", actors=()))
    await log.write(
        record(3, time="2026-01-03T10:00:00.000000Z", decision="denied", resource="mcp:slack/post")
    )
    await log.write(
        record(4, time="2026-01-04T10:00:00.000000Z", protocol="llm", resource="llm:gpt", run_id="r9")
    )
    log.close()

    def ids(**filters: Any) -> list[str]:
        return [r["request_id"] for r in query(engine, AuditQuery(**filters))]

    assert ids(subject="user:bob") == ["r2"]
    assert ids(actor="client:planner") == ["r1", "r3", "r4"]
    assert ids(actor="client:plan") == []  # an actor is matched whole
    assert ids(client="ci-bot") == ["r1", "r2", "r3", "r4"]
    assert ids(protocol="llm") == ["r4"]
    assert ids(resource="mcp:*") == ["r1", "r2", "r3"]
    assert ids(resource="mcp:slack/post") == ["r3"]
    assert ids(resource="mcp:%") == []  # LIKE wildcards are literal
    assert ids(decision="denied") == ["r3"]
    assert ids(run_id="r9") == ["r4"]
    assert ids(since=parse_time("2026-01-02"), until=parse_time("2026-01-04T00:00:00Z")) == ["r2", "r3"]
    newest = query(engine, AuditQuery(), limit=2, newest_first=True)
    assert [r["request_id"] for r in newest] == ["r4", "r3"]
    assert newest[0]["actors"] == ["client:planner"] and newest[0]["arguments"] == {"title": "x"}


def test_times_are_iso_or_ages() -> None:
    assert parse_time("2026-01-01T12:00:00Z") == "2026-01-01T12:00:00.000000Z"
    assert parse_time("2026-01-01") == "2026-01-01T00:00:00.000000Z"
    assert parse_time("15m", now=1_767_268_800.0) == "2026-01-01T11:45:00.000000Z"
    assert parse_time("2d", now=1_767_268_800.0) == "2025-12-30T12:00:00.000000Z"
    with pytest.raises(ValueError, match="invalid time"):
        parse_time("yesterday")


def test_an_otel_log_record_carries_the_time_severity_and_attributes() -> None:
    row = {
        "id": 7,
        "time": "2026-01-01T12:00:00.500000Z",
        "event": "decision",
        "decision": "denied",
        "action": "call",
        "resource": "mcp:x/y",
        "subject": "user:alice",
        "actors": ["client:a"],
        "tokens": None,
        "cost": 0.25,
        "trace_id": None,
    }
    out = otel_record(row)
    assert out["timeUnixNano"] == "1767268800500000000"
    assert (out["severityNumber"], out["severityText"]) == (13, "WARN")
    assert out["body"] == {"stringValue": "denied call mcp:x/y by user:alice"}
    attributes = {a["key"]: a["value"] for a in out["attributes"]}
    assert attributes["agentgw.id"] == {"intValue": "7"}
    assert attributes["agentgw.cost"] == {"doubleValue": 0.25}
    assert attributes["agentgw.actors"] == {"arrayValue": {"values": [{"stringValue": "client:a"}]}}
    assert "agentgw.tokens" not in attributes and "traceId" not in out
