"""`agentgw audit`: verify names the first tampered record; query, tail and export answer auditors."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from agentgw.cli import main
from agentgw.records.audit import AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog
from tests.storage.test_audit_log import record


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An audit log of six records: r0..r5, r3 denied and by user:bob."""
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    # The commands read the checkpoint sink of the data directory: this log's own, not the cwd's.
    monkeypatch.setenv("AGENTGW_DATA_DIR", str(tmp_path / "state"))
    path = tmp_path / "agentgw.db"
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))

    async def write() -> None:
        for n in range(6):
            changes = {"subject": "user:bob", "decision": "denied"} if n == 3 else {}
            await log.write(record(n, time=f"2026-01-0{n + 1}T00:00:00.000000Z", **changes))

    asyncio.run(write())
    log.close()
    engine.dispose()
    return path


def audit(path: Path, *args: str) -> int:
    return main(["audit", *args, "--database-url", f"sqlite:///{path}"])


def sql(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement)


def test_an_untouched_log_verifies(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit(database, "verify") == 0
    assert "ok: 6 records in 1 chains verify" in capsys.readouterr().out


def test_an_edited_row_fails_verify_and_is_named(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql(database, "UPDATE audit_log SET decision = 'allowed' WHERE id = 4")
    assert audit(database, "verify") == 1
    err = capsys.readouterr().err
    assert "FAILED: record 4 " in err and "was edited" in err


def test_a_deleted_row_fails_verify_and_is_named(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql(database, "DELETE FROM audit_log WHERE id = 3")
    assert audit(database, "verify") == 1
    err = capsys.readouterr().err
    assert "record(s) seq 3" in err and "before record 4" in err and "removed" in err


def test_an_inserted_row_fails_verify_and_is_named(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    columns = "chain, seq, time, event, request_id, trace_id, run_id, session_id, subject, client_id, roles, "
    columns += (
        "scopes, actors, protocol, action, resource, method, upstream, decision, reason, rule, detail, "
    )
    columns += "status, latency_ms, tokens, cost, args_digest, arguments, prev_hash, hash"
    copied = columns.replace("seq,", "seq + 6,", 1)
    sql(database, f"INSERT INTO audit_log (id, {columns}) SELECT 100, {copied} FROM audit_log WHERE id = 6")  # noqa: S608
    assert audit(database, "verify") == 1
    err = capsys.readouterr().err
    assert "FAILED: record 100 " in err and "inserted" in err


def test_removing_the_last_row_fails_verify(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql(database, "DELETE FROM audit_log WHERE id = 6")
    assert audit(database, "verify") == 1
    assert "newest record(s)" in capsys.readouterr().err


def test_a_journal_file_a_replay_gave_up_on_fails_verify(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = Path(f"{database}.audit-journal")
    journal.mkdir(exist_ok=True)  # the log's own journal directory (its segments are gone: all ingested)
    (journal / "crashed_1.1.jsonl.unreadable").write_bytes(b'{"chain": "crashed:1", oops\n')
    assert audit(database, "verify") == 1
    err = capsys.readouterr().err
    assert "FAILED: " in err and "crashed_1.1.jsonl.unreadable is left" in err


def test_query_filters_and_prints_a_table_or_json_lines(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit(database, "query", "--subject", "user:bob") == 0
    header, row, *rest = capsys.readouterr().out.splitlines()
    assert header.split("\t")[:4] == ["id", "time", "event", "decision"]
    assert row.split("\t")[3:5] == ["denied", "user:bob"] and rest == []
    assert (
        audit(database, "query", "--decision", "allowed", "--since", "2026-01-02", "--format", "jsonl") == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in lines] == ["r1", "r2", "r4", "r5"]
    assert lines[0]["actors"] == ["client:planner"]


def test_tail_shows_the_newest_records_oldest_first(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit(database, "tail", "-n", "2", "--format", "jsonl") == 0
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ["r4", "r5"]


def test_export_writes_json_lines_or_otel_log_records(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    assert audit(database, "export", "--resource", "mcp:github/*", "-o", str(out)) == 0
    assert len(out.read_text().splitlines()) == 6
    assert audit(database, "export", "--format", "otel", "--run", "run-1", "-o", str(out)) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["severityText"] == "INFO" and first["eventName"] == "agentgw.audit.decision"


def test_a_bad_time_is_a_usage_error(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit(database, "query", "--since", "last tuesday") == 2
    assert "invalid time" in capsys.readouterr().err


def test_prune_keeps_the_log_verifiable(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every record is from January 2026; an age of 0 seconds removes them all.
    assert audit(database, "prune", "--older-than", "0s") == 0
    assert "removed 6 records" in capsys.readouterr().out
    assert audit(database, "verify") == 0
