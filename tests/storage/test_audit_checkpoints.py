"""Signed checkpoints hold the audit chains against someone who can write the database (decision 0215).

Each tampering test first shows that the hash chains alone (`verify(engine)`) take the tampered log for
intact, then that the checkpoints signed with a key the database does not hold (`verify(engine, trust)`)
find it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from agentgw.errors import ConfigError
from agentgw.records.audit import AuditSettings, CheckpointSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import (
    GENESIS,
    Checkpointer,
    CheckpointKey,
    CheckpointTrust,
    SqlAuditLog,
    audit_chain,
    audit_checkpoint,
    audit_log,
    checkpointer,
    create_audit_tables,
    parse_checkpoint,
    prune,
    public_text,
    record_hash,
    trust,
    verify,
)
from tests.storage.test_audit_log import journal_dir, journal_files, record, stored_ids

EVERY = 4  # a checkpoint every four records (or as the storing thread takes them), and a final one


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    built = make_engine(url)
    create_audit_tables(built)
    with built.begin() as conn:  # the PostgreSQL database lives for the session: start clean
        for table in (audit_log, audit_chain, audit_checkpoint):
            conn.execute(delete(table))
    yield built
    built.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    built = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    yield built
    built.dispose()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """The directory of the gateway's keys (and, by default, of the checkpoint sink)."""
    return tmp_path / "keys"


def signer(keys: Path) -> Checkpointer:
    return checkpointer(CheckpointSettings(every_records=EVERY, every_s=3600), keys)


def trusted(keys: Path) -> CheckpointTrust:
    return trust(CheckpointSettings(), keys)


def new_log(engine: Engine, keys: Path, node: str = "node") -> SqlAuditLog:
    return SqlAuditLog(engine, AuditSettings(node_id=node), checkpointer=signer(keys), trust=trusted(keys))


async def written(engine: Engine, keys: Path, count: int, node: str = "node", **changes: str) -> str:
    """A gateway's life: `count` records written one call at a time, then a clean shutdown."""
    log = new_log(engine, keys, node)
    for n in range(count):
        await log.write(record(n, **changes))
    log.close()
    return log.chain


def rows_of(engine: Engine, chain: str) -> list[dict[str, object]]:
    with engine.connect() as conn:
        query = select(audit_log).where(audit_log.c.chain == chain).order_by(audit_log.c.seq)
        return [dict(r._mapping) for r in conn.execute(query)]


def sink_lines(keys: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in (keys / "audit-checkpoints.jsonl").read_bytes().splitlines()]


def drop_checkpoint_rows(engine: Engine) -> None:
    """What a database writer does next: remove the checkpoints the database holds (not the sink's)."""
    with engine.begin() as conn:
        conn.execute(delete(audit_checkpoint))


async def test_a_clean_log_verifies_against_its_checkpoints_also_after_a_restart(
    engine: Engine, keys: Path
) -> None:
    first = await written(engine, keys, 10)
    second = await written(engine, keys, 5)  # the next start: a new chain, the same key
    report = verify(engine, trusted(keys))
    assert report.ok, report.problem
    assert (report.records, report.chains, report.unproven) == (15, 2, 0)
    in_sink = [(c["chain"], c["seq"], c["last"]) for c in sink_lines(keys)]
    assert (first, 10, True) in in_sink and (second, 5, True) in in_sink
    # The periodic ones too (the journal's ingest thread signs what it took, in its own bunches).
    assert any(chain == first and not last for chain, _, last in in_sink)
    assert report.checkpoints == 2 * len(in_sink)  # each in the sink and in the database


async def test_a_live_log_verifies_and_names_the_records_no_checkpoint_covers_yet(
    engine: Engine, keys: Path
) -> None:
    log = SqlAuditLog(
        engine,
        AuditSettings(node_id="node"),
        checkpointer=checkpointer(CheckpointSettings(every_records=1000, every_s=3600), keys),
        trust=trusted(keys),
    )
    for n in range(3):
        await log.write(record(n))
    await log.flush()
    report = log.verify()
    assert report.ok, report.problem
    assert report.unproven == 3
    log.close()
    assert log.verify().unproven == 0


async def test_recomputing_every_hash_after_an_edit_is_detected(engine: Engine, keys: Path) -> None:
    chain = await written(engine, keys, 10)
    rows = rows_of(engine, chain)
    prev = rows[1]["hash"]
    with engine.begin() as conn:
        for row in rows[2:]:  # seq 3 says "denied" now, and every hash after it is recomputed
            row = row | {"prev_hash": prev, "decision": "denied" if row["seq"] == 3 else row["decision"]}
            row["hash"] = prev = record_hash(row)
            conn.execute(update(audit_log).where(audit_log.c.id == row["id"]).values(**row))
        conn.execute(update(audit_chain).where(audit_chain.c.chain == chain).values(head_hash=prev))
    drop_checkpoint_rows(engine)
    assert verify(engine).ok  # the chain alone proves nothing
    problem = verify(engine, trusted(keys)).problem
    # Named at the chain's newest checkpoint (the final one): the chain links every record before it.
    assert problem is not None and problem.kind == "edited" and problem.seq == 10
    assert "the chain was rewritten" in problem.message and "checkpoint signed at" in problem.message


async def test_truncating_the_tail_and_moving_the_head_back_is_detected(engine: Engine, keys: Path) -> None:
    chain = await written(engine, keys, 10)
    sixth = rows_of(engine, chain)[5]
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.chain == chain, audit_log.c.seq > 6))
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == chain)
            .values(head_seq=6, head_hash=sixth["hash"])
        )
    drop_checkpoint_rows(engine)
    assert verify(engine).ok
    problem = verify(engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "removed" and problem.seq == 7
    assert "(seq 7 to " in problem.message and "head moved back" in problem.message


async def test_deleting_a_whole_chain_with_its_head_row_is_detected(engine: Engine, keys: Path) -> None:
    kept = await written(engine, keys, 3, node="kept")
    gone = await written(engine, keys, 6, node="gone")
    with engine.begin() as conn:
        for table in (audit_log, audit_chain, audit_checkpoint):
            conn.execute(delete(table).where(table.c.chain == gone))
    assert verify(engine).ok
    report = verify(engine, trusted(keys))
    assert report.problem is not None and report.problem.kind == "removed"
    assert (
        report.problem.chain == gone
        and f"chain {gone!r} was removed, its head included" in report.problem.message
    )
    assert kept != gone


async def test_deleting_the_oldest_records_and_moving_the_anchor_is_detected(
    engine: Engine, keys: Path
) -> None:
    chain = await written(engine, keys, 10)
    third = rows_of(engine, chain)[2]
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.chain == chain, audit_log.c.seq <= 3))
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == chain)
            .values(anchor_seq=3, anchor_hash=third["hash"])
        )
    assert verify(engine).ok  # as retention would leave it
    problem = verify(engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "removed" and problem.seq == 3
    assert "no anchor signed by a trusted key" in problem.message


async def test_retention_signs_the_anchor_it_moves_and_the_pruned_chain_still_verifies(
    engine: Engine, keys: Path
) -> None:
    log = new_log(engine, keys)
    for n in range(4):
        await log.write(record(n, time=f"2025-06-0{n + 1}T00:00:00.000000Z"))
    for n in range(4, 10):
        await log.write(record(n, time="2026-01-01T00:00:00.000000Z"))
    log.close()
    pruner = signer(keys)
    assert prune(engine, "2025-12-01T00:00:00.000000Z", pruner) == 4
    pruner.close()
    report = verify(engine, trusted(keys))
    assert report.ok, report.problem
    assert report.records == 6
    anchors = [c for c in sink_lines(keys) if c["kind"] == "anchor"]
    assert [(c["chain"], c["seq"]) for c in anchors] == [(log.chain, 4)]
    # Pruning without the key leaves an anchor nobody signed.
    assert prune(engine, "2026-02-01T00:00:00.000000Z") == 6
    problem = verify(engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "removed" and "no anchor signed" in problem.message


async def test_records_added_after_a_final_checkpoint_are_detected(engine: Engine, keys: Path) -> None:
    chain = await written(engine, keys, 5)
    last = rows_of(engine, chain)[-1]
    added = {k: v for k, v in last.items() if k != "id"} | {
        "seq": 6,
        "prev_hash": last["hash"],
        "request_id": "x",
    }
    added["hash"] = record_hash(added)
    with engine.begin() as conn:
        conn.execute(insert(audit_log).values(**added))
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == chain)
            .values(head_seq=6, head_hash=added["hash"])
        )
    assert verify(engine).ok
    problem = verify(engine, trusted(keys)).problem
    assert (
        problem is not None
        and problem.kind == "inserted"
        and "after its final checkpoint (seq 5)" in problem.message
    )


async def test_a_checkpoint_not_signed_by_a_trusted_key_is_named(
    engine: Engine, keys: Path, tmp_path: Path
) -> None:
    chain = await written(engine, keys, 3)
    other = Checkpointer(CheckpointKey.load_or_create(tmp_path / "other.pem"), tmp_path / "other.jsonl")
    forged = other.sign("head", chain, 3, GENESIS, last=True)
    other.close()
    with engine.begin() as conn:
        conn.execute(insert(audit_checkpoint).values(chain=chain, seq=3, body=forged.line().decode()))
    problem = verify(engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "forged" and "is not trusted" in problem.message
    # Trusted (another gateway's key), its claim is held against the chain like any other.
    both = trust(CheckpointSettings(trusted_keys=[public_text(other.key.public)]), keys)
    problem = verify(engine, both).problem
    assert problem is not None and problem.kind == "edited" and problem.seq == 3


def test_a_checkpoint_edited_after_signing_does_not_verify(keys: Path) -> None:
    signed_by = signer(keys)
    line = signed_by.sign("head", "node:1", 7, "a" * 64).line()
    signed_by.close()
    keyring = trusted(keys).keys
    assert parse_checkpoint(line, keyring).seq == 7
    with pytest.raises(ValueError, match="signature does not hold"):
        parse_checkpoint(line.replace(b'"seq":7', b'"seq":9'), keyring)


def test_two_processes_creating_the_key_at_once_share_one(keys: Path) -> None:
    path = keys / "k.pem"
    ids = {CheckpointKey.load_or_create(path).id for _ in range(3)}
    assert len(ids) == 1
    assert (path.stat().st_mode & 0o777) == 0o600


def test_an_unusable_key_or_trusted_key_is_a_config_error(keys: Path) -> None:
    keys.mkdir()
    (keys / "audit-checkpoint-key.pem").write_text("not a key")
    with pytest.raises(ConfigError, match=r"audit-checkpoint-key\.pem"):
        checkpointer(CheckpointSettings(), keys)
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        trust(CheckpointSettings(key=keys / "elsewhere.pem", trusted_keys=["c2hvcnQ="]), keys)


# --- the journal (SQLite) -------------------------------------------------------------------------


@pytest.fixture
def refusing(sqlite_engine: Engine) -> Iterator[None]:
    """A database that takes no records (as during an outage) until the block's end: what is written
    stays in the journal, and the ingest thread signs it when it takes it."""
    create_audit_tables(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'full'); END"
        )
    yield
    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS refuse")


async def stopped_during_an_outage(engine: Engine, keys: Path, count: int) -> tuple[str, Path]:
    """A gateway that journaled `count` records while the database refused them, then stopped: its
    journal is left for the next start, and the final checkpoint covers it."""
    log = new_log(engine, keys)
    await asyncio.gather(*(log.write(record(n)) for n in range(count)))
    await log.flush()  # the ingest thread takes them (and signs), the database refuses them
    log.close()
    [segment] = sorted(journal_dir(engine).glob("*.jsonl"))
    return log.chain, segment


def database_back(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse")


async def test_a_truncated_journal_is_detected_after_its_replay(
    sqlite_engine: Engine, keys: Path, refusing: None
) -> None:
    chain, segment = await stopped_during_an_outage(sqlite_engine, keys, 8)
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:5]))
    database_back(sqlite_engine)
    new_log(sqlite_engine, keys, "next").close()  # the next start replays what is left
    assert stored_ids(sqlite_engine) == [f"r{n}" for n in range(5)]
    assert verify(sqlite_engine).ok
    problem = verify(sqlite_engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "removed" and problem.chain == chain
    assert "seq 6 to 8" in problem.message


async def test_a_deleted_journal_is_detected(sqlite_engine: Engine, keys: Path, refusing: None) -> None:
    chain, _ = await stopped_during_an_outage(sqlite_engine, keys, 5)
    for path in journal_dir(sqlite_engine).iterdir():
        path.unlink()
    database_back(sqlite_engine)
    new_log(sqlite_engine, keys, "next").close()
    assert verify(sqlite_engine).ok
    problem = verify(sqlite_engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "removed" and problem.chain == chain


async def test_a_journal_rewritten_with_recomputed_hashes_is_detected_after_its_replay(
    sqlite_engine: Engine, keys: Path, refusing: None
) -> None:
    _, segment = await stopped_during_an_outage(sqlite_engine, keys, 6)
    rows, prev = [orjson.loads(line) for line in segment.read_bytes().splitlines()], GENESIS
    for row in rows:
        row |= {"prev_hash": prev, "decision": "denied" if row["seq"] == 2 else row["decision"]}
        row["hash"] = prev = record_hash(row)
    segment.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    database_back(sqlite_engine)
    new_log(sqlite_engine, keys, "next").close()
    assert len(stored_ids(sqlite_engine)) == 6
    assert verify(sqlite_engine).ok
    problem = verify(sqlite_engine, trusted(keys)).problem
    assert problem is not None and problem.kind == "edited" and problem.seq is not None and problem.seq >= 2


async def test_an_edited_line_of_a_live_journal_is_detected(sqlite_engine: Engine, keys: Path) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    await log.write(record(1))
    await log.flush()
    [segment] = sorted(journal_dir(sqlite_engine).glob("*.jsonl"))
    # The row in the database and in the journal (the segment stays until it is full or closed).
    assert verify(sqlite_engine).ok
    segment.write_bytes(segment.read_bytes().replace(b'"allowed"', b'"denied"'))
    problem = verify(sqlite_engine).problem
    assert (
        problem is not None
        and problem.kind == "edited"
        and f"line 1 of the journal segment {segment}" in problem.message
    )
    log.close()


async def test_a_journal_line_differing_from_the_database_is_detected(sqlite_engine: Engine) -> None:
    log = SqlAuditLog(sqlite_engine, AuditSettings(node_id="node"))
    for n in range(3):
        await log.write(record(n))
    await log.flush()
    rows = rows_of(sqlite_engine, log.chain)
    prev = rows[0]["hash"]
    with sqlite_engine.begin() as conn:  # the database rewritten from seq 2 on, its head moved along
        for row in rows[1:]:
            row = row | {"prev_hash": prev, "subject": "user:mallory"}
            row["hash"] = prev = record_hash(row)
            conn.execute(update(audit_log).where(audit_log.c.id == row["id"]).values(**row))
        conn.execute(update(audit_chain).where(audit_chain.c.chain == log.chain).values(head_hash=prev))
    problem = verify(sqlite_engine).problem
    assert problem is not None and problem.kind == "edited" and problem.seq == 2
    assert "its line in the journal" in problem.message
    log.close()


async def test_records_still_in_the_journal_are_counted_as_pending_not_failed(
    sqlite_engine: Engine, keys: Path, refusing: None
) -> None:
    await stopped_during_an_outage(sqlite_engine, keys, 4)
    report = verify(sqlite_engine, trusted(keys))
    assert report.ok, report.problem
    assert report.pending == 4 and journal_files(sqlite_engine) != []
