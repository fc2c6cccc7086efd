"""The SQL audit log: group commit, one hash chain per writer, verify against tampering, queries, export."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord, AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import (
    GENESIS,
    HASHED,
    LINGER_S,
    AuditQuery,
    SqlAuditLog,
    audit_chain,
    audit_log,
    create_audit_tables,
    otel_record,
    parse_time,
    prune,
    query,
    record_hash,
    verify,
)
from agentgw.storage.audit import ingest as ingest_module
from agentgw.storage.audit import journal as journal_module
from agentgw.storage.audit.chain import stored_row  # the exact bytes a record is hashed from
from tests.support.crash import kill_when_ready

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


def test_a_log_that_commits_while_its_writers_wait_reports_no_problem(engine: Engine) -> None:
    # No journal to open, to fall behind or to fail ingesting: readiness and the problem gauge see none.
    log = SqlAuditLog(engine, AuditSettings(node_id="node", durability="power"))
    assert log.problem() is None
    assert log.backlog() is None
    log.close()


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


async def test_an_outcome_nobody_waits_for_shares_the_next_decisions_commit(engine: Engine) -> None:
    # durability power: the writer thread commits while the waiters wait (the journal: below)
    log = SqlAuditLog(engine, AuditSettings(node_id="node", durability="power"))
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
    row = stored_row(
        record(1, roles=("role:a", "role:b"), latency_ms=1.5, tokens=3, cost=0.25), "node:abc", 1, GENESIS
    )
    assert row["roles"] == '["role:a","role:b"]' and row["scopes"] == "[]"
    assert record_hash(row) == HASH_OF_RECORD_1


def test_a_stored_row_is_in_hash_order() -> None:
    # The loop hashes the row's plain JSON: it must be the canonical JSON `record_hash` hashes.
    rec = record(1, roles=("role:a",), scopes=("s:1", "s:2"), upstream_actors=("client:x",), reason="r")
    row = stored_row(rec, "node:abc", 7, "f" * 64)
    assert list(row) == sorted(HASHED)
    assert orjson.dumps(row) == orjson.dumps(
        {name: row[name] for name in HASHED}, option=orjson.OPT_SORT_KEYS
    )


def test_the_loop_chains_a_record_to_the_same_hash_and_journals_it_whole(tmp_path: Path) -> None:
    log = SqlAuditLog(make_engine(f"sqlite:///{tmp_path / 'audit.db'}"), AuditSettings(node_id="node"))
    log.chain = "node:abc"
    rec = record(1, roles=("role:a", "role:b"), latency_ms=1.5, tokens=3, cost=0.25)
    rows, data, seq, head = log._chained([rec])
    log.close()
    assert (seq, head) == (1, HASH_OF_RECORD_1) and rows[0]["hash"] == HASH_OF_RECORD_1
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert data == orjson.dumps(rows[0]) + b"\n"  # the journal line is the stored row, hash last


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


# --- the journal (SQLite with durability crash, decision 0210) ------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    built = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    yield built
    built.dispose()


@pytest.fixture
def no_timely_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingest thread runs only when woken (a flush, close or a large backlog), never on its own."""
    monkeypatch.setattr(ingest_module, "INGEST_EVERY_S", 3600.0)


def journal_dir(engine: Engine) -> Path:
    return Path(f"{engine.url.database}.audit-journal")


def journal_files(engine: Engine) -> list[str]:
    directory = journal_dir(engine)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def journaled_ids(engine: Engine) -> list[str]:
    lines = b"".join(p.read_bytes() for p in sorted(journal_dir(engine).glob("*.jsonl"))).splitlines()
    return [orjson.loads(line)["request_id"] for line in lines]


def stored_ids(engine: Engine) -> list[str]:
    return [r["request_id"] for r in query(engine, AuditQuery(), limit=10_000)]


def dead_journal(engine: Engine, chain: str, lines: list[bytes], number: int = 1) -> Path:
    """A journal segment as a process that died left it (its lock file there, and free)."""
    directory = journal_dir(engine)
    directory.mkdir(exist_ok=True)
    chain_id = chain.replace(":", "_")
    (directory / f"{chain_id}.lock").touch()
    segment = directory / f"{chain_id}.{number}.jsonl"
    segment.write_bytes(b"".join(lines))
    return segment


def chained_lines(chain: str, records: list[AuditRecord]) -> list[bytes]:
    """The journal lines of `records` as the event loop writes them (the hash last)."""
    lines, prev = [], GENESIS
    for seq, rec in enumerate(records, 1):
        row = stored_row(rec, chain, seq, prev)
        row["hash"] = prev = record_hash(row)
        lines.append(orjson.dumps(row) + b"\n")
    return lines


async def test_a_written_record_is_in_the_journal_before_it_is_in_sql_and_in_sql_after_flush(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, no_timely_ingest: None
) -> None:
    wakes = await cross_thread_wakes(monkeypatch)
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    await write_all(log, [record(n) for n in range(2, 12)])
    # Answered from the loop, without a round trip through a thread.
    assert wakes == []
    assert journaled_ids(sqlite_engine) == [f"r{n}" for n in range(1, 12)]
    assert stored_ids(sqlite_engine) == []
    with anyio.fail_after(10):
        await log.flush()
    assert stored_ids(sqlite_engine) == [f"r{n}" for n in range(1, 12)]
    assert verify(sqlite_engine).ok
    log.close()


async def test_an_outcome_nobody_waits_for_shares_the_next_decisions_journal_write(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    writes: list[bytes] = []
    write = journal_module.os.write

    def counted(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", counted)  # counts, writes as ever
    log.submit(record(2, event="outcome"))
    await asyncio.sleep(0)  # a turn of the loop: the outcome alone is not written
    await log.write(record(3))
    monkeypatch.undo()
    assert [orjson.loads(line)["request_id"] for line in b"".join(writes).splitlines()] == ["r2", "r3"]
    assert len(writes) == 1
    log.close()
    assert stored_ids(sqlite_engine) == ["r1", "r2", "r3"]


async def test_close_ingests_everything_and_leaves_no_journal_behind(
    sqlite_engine: Engine, no_timely_ingest: None
) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await write_all(log, [record(n) for n in range(20)])
    log.submit(record(20, event="outcome"))
    assert journal_files(sqlite_engine) != []
    log.close()
    assert journal_files(sqlite_engine) == []
    assert stored_ids(sqlite_engine) == [f"r{n}" for n in range(21)]
    assert verify(sqlite_engine).ok


async def test_segments_rotate_and_are_deleted_once_ingested(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, no_timely_ingest: None
) -> None:
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 1)  # every write starts a new segment
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    for n in range(4):
        await log.write(record(n))
    segments = [name for name in journal_files(sqlite_engine) if name.endswith(".jsonl")]
    assert len(segments) == 4
    with anyio.fail_after(10):
        await log.flush()
    # Ingested: every closed segment is gone; the one being written stays until close.
    assert [name for name in journal_files(sqlite_engine) if name.endswith(".jsonl")] == [segments[-1]]
    log.close()
    assert journal_files(sqlite_engine) == []
    assert stored_ids(sqlite_engine) == ["r0", "r1", "r2", "r3"]


async def test_a_held_write_lock_does_not_block_the_loop_and_records_reach_sql_in_order(
    sqlite_engine: Engine,
) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    with anyio.fail_after(10):
        await log.flush()
    other = sqlite3.connect(str(sqlite_engine.url.database), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (a prune, the budget ledger) holds the lock
    with anyio.fail_after(1):  # far less than the ingest thread's 5 s wait for the lock
        await log.write(record(2))
        log.submit(record(3, event="outcome"))
        await write_all(log, [record(4), record(5)])
    assert journaled_ids(sqlite_engine)[-4:] == ["r2", "r3", "r4", "r5"]
    flushed = asyncio.create_task(log.flush())
    # The event loop is not blocked by the lock: other work goes on while the ingest waits.
    await asyncio.wait_for(asyncio.sleep(0.05), 1)
    assert not flushed.done()
    other.execute("ROLLBACK")
    with anyio.fail_after(10):
        await flushed
    other.close()
    log.close()
    assert stored_ids(sqlite_engine) == ["r1", "r2", "r3", "r4", "r5"]
    assert verify(sqlite_engine).ok


async def test_while_ingest_fails_new_records_are_refused_and_it_recovers(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture, no_timely_ingest: None
) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    other = sqlite3.connect(str(sqlite_engine.url.database), isolation_level=None)
    # A database that takes no records (as a full disk would), until the trigger goes.
    other.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'full'); END")
    await log.write(record(1))  # in the journal: durable, so the call may go on
    with anyio.fail_after(10):
        await log.flush()  # the ingest fails; a flush does not hang on it
    assert stored_ids(sqlite_engine) == []
    with pytest.raises(Unavailable, match="audit log unavailable"):
        await log.write(record(2))
    log.submit(record(3, event="outcome"))
    with anyio.fail_after(10):
        await log.flush()
    assert "audit record not written: outcome allowed r3" in caplog.text
    other.execute("DROP TRIGGER refuse")
    other.close()
    with anyio.fail_after(10):
        await log.flush()  # woken by the flush, the retry works
    await log.write(record(4))
    log.close()
    assert stored_ids(sqlite_engine) == ["r1", "r4"]
    assert verify(sqlite_engine).ok
    assert journal_files(sqlite_engine) == []


async def test_a_failed_journal_write_refuses_its_batch_and_the_next_write_starts_a_new_segment(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, no_timely_ingest: None
) -> None:
    """The failure is injected by monkeypatching `os.write` in the module under test: a short write,
    as a full disk makes (half the bytes land)."""
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    write = journal_module.os.write

    def short(fd: int, data: bytes) -> int:
        if b'"request_id":"doomed' in data:
            return write(fd, data[: len(data) // 2])
        return write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", short)
    with pytest.raises(Unavailable, match="audit log unavailable"):
        await log.write(replace(BASE, request_id="doomed"))
    monkeypatch.undo()
    await log.write(record(3))
    segments = sorted(journal_dir(sqlite_engine).glob("*.jsonl"))
    assert len(segments) == 2
    assert segments[0].read_bytes().endswith(b"\n")  # the torn half was cut off
    assert journaled_ids(sqlite_engine) == ["r1", "r3"]
    log.close()
    assert stored_ids(sqlite_engine) == ["r1", "r3"]
    assert verify(sqlite_engine).ok  # the chain did not advance over the refused record


CRASHING_WRITER = """
import asyncio, sys
from agentgw.records.audit import AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog, ingest
from tests.storage.test_audit_log import record

ingest.INGEST_EVERY_S = 3600.0  # only a flush ingests

async def main() -> None:
    log = SqlAuditLog(make_engine(sys.argv[1]), AuditSettings(node_id="crashing"))
    for n in range(5):
        await log.write(record(n))
    await log.flush()  # these five are in SQL; the next five only in the journal
    for n in range(5, 10):
        await log.write(record(n))
    print("written", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until killed

asyncio.run(main())
"""


async def test_a_new_log_replays_the_journal_of_a_sigkilled_process_and_the_chain_verifies(
    sqlite_engine: Engine,
) -> None:
    await kill_when_ready(
        CRASHING_WRITER, sqlite_engine.url.render_as_string(hide_password=False), ready=b"written"
    )
    assert stored_ids(sqlite_engine) == [f"r{n}" for n in range(5)]
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="next"))  # the next start
    assert stored_ids(sqlite_engine) == [f"r{n}" for n in range(10)]
    report = verify(sqlite_engine)
    assert report.ok and report.records == 10, report.problem
    assert [name for name in journal_files(sqlite_engine) if not name.startswith("next_")] == []
    log.close()
    assert journal_files(sqlite_engine) == []


async def test_a_journal_with_its_keys_in_another_order_is_replayed(sqlite_engine: Engine) -> None:
    # Lines as an earlier version wrote them (the record's field order, then chain, seq, hashes): a
    # line is read as a mapping, whatever the order of its keys.
    create_audit_tables(sqlite_engine)
    lines = [
        orjson.dumps(dict(reversed(orjson.loads(line).items()))) + b"\n"
        for line in chained_lines("dead:0", [record(n) for n in range(3)])
    ]
    dead_journal(sqlite_engine, "dead:0", lines)
    SqlAuditLog(sqlite_engine, AuditSettings(node_id="next")).close()
    assert stored_ids(sqlite_engine) == ["r0", "r1", "r2"]
    assert verify(sqlite_engine).ok


async def test_a_torn_last_line_is_dropped_and_the_rest_replayed(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    create_audit_tables(sqlite_engine)
    lines = chained_lines("dead:1", [record(n) for n in range(3)])
    dead_journal(sqlite_engine, "dead:1", [*lines[:2], lines[2][:40]])
    SqlAuditLog(sqlite_engine, AuditSettings(node_id="next")).close()
    assert stored_ids(sqlite_engine) == ["r0", "r1"]
    assert verify(sqlite_engine).ok
    assert "torn last line" in caplog.text
    assert journal_files(sqlite_engine) == []


async def test_a_corrupt_middle_line_stops_the_replay_and_leaves_unreadable_files(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    create_audit_tables(sqlite_engine)
    lines = chained_lines("dead:2", [record(n) for n in range(4)])
    segment = dead_journal(sqlite_engine, "dead:2", [lines[0], b'{"chain": "dead:2", oops\n', *lines[2:]])
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="next"))
    await log.write(record(9))  # the gateway starts and serves all the same
    log.close()
    assert stored_ids(sqlite_engine) == ["r0", "r9"]
    # What was ingested verifies, but the records left behind are not in the database: verify fails.
    problem = verify(sqlite_engine).problem
    assert problem is not None and problem.kind == "unreadable"
    assert f"{segment}.unreadable is left" in problem.message
    assert f"{segment} line 2" in caplog.text
    assert journal_files(sqlite_engine) == ["dead_2.1.jsonl.unreadable", "dead_2.lock.unreadable"]
    SqlAuditLog(sqlite_engine, AuditSettings(node_id="again")).close()  # nothing is replayed twice
    assert stored_ids(sqlite_engine) == ["r0", "r9"]


async def test_a_broken_chain_in_the_journal_stops_the_replay_there(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    create_audit_tables(sqlite_engine)
    lines = chained_lines("dead:3", [record(n) for n in range(3)])
    edited = orjson.loads(lines[1]) | {"decision": "denied"}  # its hash no longer matches
    dead_journal(sqlite_engine, "dead:3", [lines[0], orjson.dumps(edited) + b"\n", lines[2]])
    SqlAuditLog(sqlite_engine, AuditSettings(node_id="next")).close()
    assert stored_ids(sqlite_engine) == ["r0"]
    assert "does not match its hash" in caplog.text
    problem = verify(sqlite_engine).problem
    assert (
        problem is not None
        and problem.kind == "unreadable"
        and "dead_3.1.jsonl.unreadable" in problem.message
    )


async def test_the_journal_of_a_live_log_is_not_touched_by_another_logs_replay(
    sqlite_engine: Engine, no_timely_ingest: None
) -> None:
    live = SqlAuditLog(sqlite_engine, AuditSettings(node_id="live"))
    await write_all(live, [record(n) for n in range(3)])
    before = journal_files(sqlite_engine)
    SqlAuditLog(sqlite_engine, AuditSettings(node_id="other")).close()
    assert journal_files(sqlite_engine) == before
    assert stored_ids(sqlite_engine) == []
    live.close()
    assert stored_ids(sqlite_engine) == ["r0", "r1", "r2"]
    assert verify(sqlite_engine).ok
