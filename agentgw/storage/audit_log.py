"""The audit log in SQL: append-only, hash-chained, written by group commit; queries and `verify`.

Chains: every gateway process appends to its own chain, named `<node>:<random>` at start-up, so
several processes (on one machine or many) can write one table without coordinating. Each record
holds its chain, its position `seq` (1, 2, ...), the hash of its predecessor in the chain and its
own hash: SHA-256 over the canonical JSON of all its columns but `id` and `hash`. The
`audit_chain` table holds each chain's head (last seq and hash), updated in the same transaction
as the records, so that removing the newest records is detected too; retention moves a chain's
anchor (the last removed record) forward so that a pruned chain still verifies.

Writing (decision 0210): `SqlAuditLog.write` queues the record and returns once it is durable;
`submit` queues it and returns (the outcome records: decision 0207). Records queued in one turn of the
event loop are stored together at its end; outcomes, which nobody waits for, linger up to `LINGER_S`
to share the next write. How they are stored:
- SQLite with `audit.durability: crash` (the default): the loop gives them their place in the chain
  (the chain head lives in memory) and appends them as JSON lines to this process's journal, a
  segment file in `<database file>.audit-journal/`, with one `os.write`; a record in the page cache
  survives the process dying (SIGKILL included), as a WAL commit with `synchronous=NORMAL` does.
  Their waiters are answered at once. An ingest thread commits the journaled rows to SQL every
  `INGEST_EVERY_S` (at once for a `flush`, `close` or a large backlog), in short GIL holds, and
  deletes the segments it has covered. At start-up, the journals of processes that are gone (their
  lock file is free) are replayed into SQL (`replay_journals`). While ingest fails, or the backlog
  passes `BACKLOG_MAX`, new records are refused (fail closed).
- Otherwise (PostgreSQL, or `durability: power`, a disk flush per commit): a writer thread commits
  each batch in one transaction (at most `batch_max` records) while its waiters wait, and wakes each
  event loop once per batch (`call_soon_threadsafe`).
A record that cannot be stored (the journal write or the transaction failed) fails every waiter of
its batch with `Unavailable`, its submitted records are logged, and the chain does not advance.
`flush` waits until everything queued before it is committed to SQL, so that a reader in the same
process sees the submitted records; `close` commits everything queued (and removes the journal).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import queue
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from agentgw.errors import Unavailable
from agentgw.filters.audit import AuditRecord, AuditSettings, not_written, timestamp
from agentgw.storage.audit_checkpoints import (
    Checkpoint,
    Checkpointer,
    CheckpointTrust,
    parse_checkpoint,
    read_sink,
)
from agentgw.storage.db import STATEMENT_TIMEOUT_S

__all__ = [
    "GENESIS",
    "AuditQuery",
    "Problem",
    "SqlAuditLog",
    "VerifyReport",
    "create_audit_tables",
    "journal_directory",
    "otel_record",
    "parse_time",
    "prune",
    "query",
    "record_hash",
    "verify",
]

log = logging.getLogger(__name__)

GENESIS = "0" * 64
PRUNE_EVERY_S = 3600.0
# How long records nobody waits for (outcomes, decision 0207) may wait to share a later write.
LINGER_S = 0.05
# The journal (decision 0210): how often the ingest thread commits what the loop appended, in chunks
# of how many rows per GIL hold; how long it waits before retrying a failed ingest; how far behind SQL
# may fall before records are refused; when the loop starts a new segment file.
INGEST_EVERY_S = 0.05
INGEST_CHUNK = 32
RETRY_S = 1.0
BACKLOG_MAX = 100_000
SEGMENT_BYTES = 4 * 1024 * 1024
# After this long idle, the ingest thread checkpoints the WAL; it waits this long for a lock.
CHECKPOINT_EVERY_S = 1.0
BUSY_TIMEOUT_MS = 5000

# Core tables on their own metadata: the log is often a database of its own (`audit.database_url`).
metadata = MetaData()
audit_log = Table(
    "audit_log",
    metadata,
    # BIGINT on PostgreSQL; SQLite auto-increments only an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("chain", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("time", String(32), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("request_id", String(64), nullable=False, index=True),
    Column("trace_id", String(64)),
    Column("run_id", String(128), index=True),
    Column("session_id", String(256)),
    Column("subject", String(512), index=True),
    Column("client_id", String(512)),
    Column("roles", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("actors", Text, nullable=False),
    # How the upstream was credentialed, and the delegation chain its token carries (issue 4).
    Column("credential_mode", String(32)),
    Column("upstream_actors", Text, nullable=False, server_default="[]"),
    Column("protocol", String(16), nullable=False),
    Column("action", String(16), nullable=False),
    Column("resource", Text, nullable=False),
    Column("method", String(256), nullable=False),
    Column("upstream", String(256), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("reason", String(64)),
    Column("rule", Text),
    Column("detail", Text),
    Column("status", String(64)),
    Column("latency_ms", Float),
    Column("tokens", BigInteger),
    Column("cost", Float),
    Column("args_digest", String(80)),
    Column("arguments", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("chain", "seq", name="uq_audit_log_chain_seq"),
)
audit_chain = Table(
    "audit_chain",
    metadata,
    Column("chain", String(200), primary_key=True),
    Column("node", String(200), nullable=False),
    Column("started_at", String(32), nullable=False),
    Column("head_seq", BigInteger, nullable=False),
    Column("head_hash", String(64), nullable=False),
    # Retention removed every record up to anchor_seq; the chain continues from anchor_hash.
    Column("anchor_seq", BigInteger, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
)
# Signed checkpoints and anchors (decision 0215), each stored as its whole signed line: `verify`
# checks every signature, so a row counts for what it says, not for being here.
audit_checkpoint = Table(
    "audit_checkpoint",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("chain", String(200), nullable=False, index=True),
    Column("seq", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
)
_LIST_COLUMNS = ("roles", "scopes", "actors", "upstream_actors")
HASHED = tuple(
    str(c.name) for c in audit_log.columns if c.name not in ("id", "hash")
)  # orjson keys must be str


def create_audit_tables(engine: Engine) -> None:
    """Create the audit tables if they are missing (idempotent)."""
    metadata.create_all(engine)


def record_hash(row: Mapping[Any, Any]) -> str:
    """The hash of a stored record: SHA-256 over the canonical JSON of every column but id and hash."""
    content = {name: row[name] for name in HASHED}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def journal_directory(engine: Engine) -> Path | None:
    """Where the journal of a SQLite file database lives (`<file>.audit-journal`); None otherwise."""
    url = engine.url
    file_db = url.database not in (None, "", ":memory:") and not url.query
    if engine.dialect.name != "sqlite" or not file_db:
        return None
    return Path(f"{url.database}.audit-journal")


def _checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"chain": checkpoint.chain, "seq": checkpoint.seq, "body": checkpoint.line().decode()}


def _json_list(values: tuple[str, ...]) -> str:
    return orjson.dumps(values).decode() if values else "[]"  # a tuple is a JSON array, as a list is


def _stored(record: AuditRecord, chain: str, seq: int, prev_hash: str) -> dict[str, Any]:
    """The stored row of `record` at `seq` of `chain`, but its hash.

    Every hashed column, written out in sorted order: the row's plain JSON is then the canonical JSON
    `record_hash` hashes, without a copy and a sort per record (`test_a_stored_row_is_in_hash_order`).
    """
    return {
        "action": record.action,
        "actors": _json_list(record.actors),
        "args_digest": record.args_digest,
        "arguments": record.arguments,
        "chain": chain,
        "client_id": record.client_id,
        "cost": record.cost,
        "credential_mode": record.credential_mode,
        "decision": record.decision,
        "detail": record.detail,
        "event": record.event,
        "latency_ms": record.latency_ms,
        "method": record.method,
        "prev_hash": prev_hash,
        "protocol": record.protocol,
        "reason": record.reason,
        "request_id": record.request_id,
        "resource": record.resource,
        "roles": _json_list(record.roles),
        "rule": record.rule,
        "run_id": record.run_id,
        "scopes": _json_list(record.scopes),
        "seq": seq,
        "session_id": record.session_id,
        "status": record.status,
        "subject": record.subject,
        "time": record.time,
        "tokens": record.tokens,
        "trace_id": record.trace_id,
        "upstream": record.upstream,
        "upstream_actors": _json_list(record.upstream_actors),
    }


# Built once: constructing a statement costs more than executing a cached one.
_INSERT = insert(audit_log)
_ADVANCE = (
    update(audit_chain)
    .where(audit_chain.c.chain == bindparam("of_chain"))
    .values(head_seq=bindparam("to_seq"), head_hash=bindparam("to_hash"))
)
# The same statements for the driver's own sqlite3 connection that ingests the journal.
_INSERT_COLUMNS = tuple(str(c.name) for c in audit_log.columns if c.name != "id")
_CHAIN_COLUMNS = tuple(str(c.name) for c in audit_chain.columns)


def _named(table: Table, columns: Sequence[str]) -> str:
    # Compiled by SQLAlchemy for SQLite once: `INSERT INTO t (a, b) VALUES (:a, :b)`.
    dialect = sqlite_dialect.dialect(paramstyle="named")
    return str(insert(table).compile(dialect=dialect, column_keys=list(columns)))


_INSERT_SQL = _named(audit_log, _INSERT_COLUMNS)
_CHAIN_SQL = _named(audit_chain, _CHAIN_COLUMNS)
_CHECKPOINT_SQL = _named(audit_checkpoint, ("chain", "seq", "body"))
_VALUES = "(" + ", ".join("?" * len(_INSERT_COLUMNS)) + ")"
# One statement inserts a whole chunk: sqlite3 lets go of the GIL around every statement it steps,
# and the loop takes it back each time; a statement per row made the ingest thread dearer than the
# rows (bench/RESULTS.md). INGEST_CHUNK x 31 parameters stays far below SQLite's limit (32,766).
_INSERT_CHUNK_SQL = {
    n: f"INSERT INTO audit_log ({', '.join(_INSERT_COLUMNS)}) VALUES {', '.join([_VALUES] * n)}"  # noqa: S608 - the table's own column names and placeholders, no input
    for n in range(1, INGEST_CHUNK + 1)
}
_ADVANCE_SQL = "UPDATE audit_chain SET head_seq = ?, head_hash = ? WHERE chain = ?"
_HEAD_SQL = "SELECT head_seq, head_hash FROM audit_chain WHERE chain = ?"


@dataclass(slots=True)
class _Pending:
    """A record to store, or (no record) a flush barrier; with a `future` on `loop` when awaited."""

    record: AuditRecord | None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None


def _wake(settled: Sequence[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for future, error in settled:
        if future.done():  # the waiter was cancelled; the record is written (or not) all the same
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _settle(batch: Sequence[_Pending], error: Unavailable | None) -> None:
    """Answer the waiters of `batch` (one wake-up per event loop); log its submitted records on error.

    A flush barrier (no record) is answered with success either way: it waits for the batch to be
    done, not for it to succeed.
    """
    waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Unavailable | None]]] = {}
    for pending in batch:
        if pending.future is not None and pending.loop is not None:
            outcome = error if pending.record is not None else None
            waiting.setdefault(pending.loop, []).append((pending.future, outcome))
        elif error is not None and pending.record is not None:
            not_written(pending.record, exc_info=False)  # submitted: nobody waits to hear
    for loop, settled in waiting.items():
        try:
            if _on(loop):
                _wake(settled)
            else:
                # Each wake-up costs the loop a self-pipe write and a turn, and the GIL: one per loop.
                loop.call_soon_threadsafe(_wake, settled)
        except RuntimeError:  # that event loop is closed: nobody waits any more
            continue


def _unavailable(why: str, cause: BaseException | None = None) -> Unavailable:
    error = Unavailable(f"audit log unavailable: {why}")
    error.__cause__ = cause
    return error


_CANNOT_RECORD = "the call cannot be recorded, so it was not forwarded"


class SqlAuditLog:
    """The `AuditSink` of the gateway: one hash chain per process, stored in batches by one thread."""

    def __init__(
        self,
        engine: Engine,
        settings: AuditSettings | None = None,
        *,
        clock: Any = time.time,
        checkpointer: Checkpointer | None = None,
        trust: CheckpointTrust | None = None,
        timeout_s: float = STATEMENT_TIMEOUT_S,
    ) -> None:
        """A log appending to a new chain of `engine`'s tables.

        Args:
            checkpointer: signs this chain's head now and then, and anchors when pruning
                (decision 0215); without it nothing is signed.
            trust: what `verify` holds the chains to.
            timeout_s: how long `write` waits for its record to be stored.
        """
        settings = settings or AuditSettings()
        self.engine = engine
        self._timeout_s = timeout_s
        self.node = settings.node_id or socket.gethostname()
        self.chain = f"{self.node}:{uuid.uuid4().hex[:12]}"
        self._batch_max = settings.batch_max
        self._synchronous = "FULL" if settings.durability == "power" else "NORMAL"
        self._retention_days = settings.retention_days
        self._clock = clock
        # Queued in this turn of the event loop, handed on at its end (`_hand_off`).
        self._outbox: list[_Pending] = []
        self._hand_off_on: asyncio.AbstractEventLoop | None = None  # the loop that will hand it off
        self._linger_on: asyncio.AbstractEventLoop | None = None  # whose timer hands lingerers off
        self._thread: threading.Thread | None = None
        self._used = False
        # Guards `_closed`, the hand-over to the thread and its counters: nothing is queued after
        # close, where the thread would never see it and its waiter would wait for ever.
        self._lock = threading.Lock()
        self._head = (0, GENESIS)
        self._chain_written = False
        self._conn: Connection | None = None
        self._head_unsure = False  # a commit failed: it may have happened all the same
        self._committing_since: float | None = None  # when the writer thread began its current commit
        self._pruned_at = 0.0
        self._closed = False
        # Transactions committed so far (group commit makes this far fewer than the records).
        self.commits = 0
        # SQLite without a flush per commit: records go to a journal file on the loop, and a thread
        # ingests them into SQL in batches (decision 0210). Otherwise a writer thread commits them
        # while their waiters wait (`_queue`).
        url = engine.url
        file_db = url.database not in (None, "", ":memory:") and not url.query
        sqlite_path = url.database if engine.dialect.name == "sqlite" and file_db else None
        self._journal_path = (
            Path(f"{sqlite_path}.audit-journal")
            if sqlite_path is not None and settings.durability == "crash"
            else None
        )
        self._sqlite_path = sqlite_path
        self._queue: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        self._journal: _Journal | None = None
        self._append_lock = threading.Lock()  # the loop appends; so may `close`, from another thread
        self._rows: list[dict[str, Any]] = []  # journaled, not yet taken by the ingest thread
        self._barriers: list[tuple[int, _Pending]] = []  # flushes waiting for rows up to a count
        self._journaled = 0  # rows appended to the journal so far
        self._ingested = 0  # of which committed to SQL
        self._failing = False  # the last ingest failed: new records are refused
        self._stopping = False
        self._ingest_wake = threading.Event()
        self._ingest_conn: sqlite3.Connection | None = None
        # Checkpoints (decision 0215), signed by the thread that stores the records, and at close.
        self._checkpointer = checkpointer
        self.trust = trust
        self._signed = (0, time.monotonic())  # this chain's newest checkpoint: its seq, and when
        self._unstored: list[Checkpoint] = []  # signed, not yet in the database
        self._taken = (0, GENESIS)  # the newest row the ingest thread took from the journal
        try:
            create_audit_tables(engine)
        except SQLAlchemyError:
            # Start anyway: every call then fails with 503 until the store is back (fail closed).
            log.exception("audit log: cannot create its tables; calls will be refused until it can")
        if self._journal_path is not None:
            self._open_journal(self._journal_path)

    def _open_journal(self, directory: Path) -> None:
        try:
            replay_journals(str(self._sqlite_path), directory, self._checkpointer)
        except Exception:  # start anyway: what is not replayed stays in the journal for the next start
            log.exception("audit log: replaying the journals in %s failed", directory)
        try:
            self._journal = _Journal(directory, self.chain)
        except OSError:
            # Fail closed: without a journal every record, so every call, is refused.
            log.exception("audit log: cannot open its journal in %s; calls will be refused", directory)

    # --- the sink ---
    async def write(self, record: AuditRecord) -> None:
        """Queue `record` and return once it is durable (in the journal, or committed).

        Raises:
            Unavailable: the record could not be stored, or not within `timeout_s` (a hung database: the
                writer commits it later if it can, and the call it records is refused now; while the
                writer's commit has hung longer than that, records are refused at once), or the log is
                closed.
        """
        since = self._committing_since
        if since is not None and time.monotonic() - since > self._timeout_s:
            # A hung database: refused at once, and not queued behind the commit that hangs.
            raise _unavailable(f"the database has not answered for {self._timeout_s:g}s; {_CANNOT_RECORD}")
        future = asyncio.get_running_loop().create_future()
        self._put(_Pending(record, future.get_loop(), future))
        try:
            async with asyncio.timeout(self._timeout_s):
                await future
        except TimeoutError as exc:
            raise _unavailable(f"no answer within {self._timeout_s:g}s; {_CANNOT_RECORD}", exc) from exc

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` and return at once; if it cannot be stored, it is logged.

        Raises:
            Unavailable: the log is closed.
        """
        self._put(_Pending(record))

    async def flush(self) -> None:
        """Return once every record queued before this call is committed (or failed, and was logged).

        Readers in this process await it first, so they see the records `submit` queued.
        """
        if not self._used:
            return  # nothing was ever queued
        future = asyncio.get_running_loop().create_future()
        try:
            self._put(_Pending(None, future.get_loop(), future))
        except Unavailable:
            return  # closing: close commits everything queued before it
        await future

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, commit it, then stop the thread (and remove an ingested journal)."""
        with self._lock:
            self._closed = True
            batch, self._outbox = self._outbox, []
            if self._journal_path is None and self._thread is not None:
                if batch:
                    self._queue.put(batch)
                self._queue.put(None)
        if self._journal_path is not None:
            if batch:
                self._append(batch)
            with self._lock:
                self._stopping = True
            self._ingest_wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._journal is not None:
            with self._lock:
                ingested = self._ingested == self._journaled and not self._thread_alive()
            self._journal.close(remove=ingested)
            if not ingested:
                log.warning(
                    "audit log: %d records are only in the journal %s; the next start ingests them",
                    self._journaled - self._ingested,
                    self._journal_path,
                )
            self._journal = None
        if self._checkpointer is not None and not self._thread_alive():
            # The final checkpoint: `verify` takes any record after it for an insertion.
            self._maybe_checkpoint(*self._head, last=True)
            self._store_checkpoints(self._ingested if self._journal_path is not None else self._head[0])
            self._checkpointer.close()
        for conn in (self._conn, self._ingest_conn):
            if conn is not None:
                conn.close()
        self._conn = self._ingest_conn = None

    def verify(self) -> VerifyReport:
        """`verify` of this log's database, held to its checkpoints (`trust`)."""
        return verify(self.engine, self.trust)

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, pending: _Pending) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if self._closed:
                raise Unavailable("audit log unavailable: the gateway is shutting down")
            self._used = True
            if self._thread is None:
                self._start_thread()
            self._outbox.append(pending)
            if loop is not None:
                schedule = linger = False
                if pending.future is not None or len(self._outbox) >= self._batch_max:
                    schedule = self._hand_off_on is not loop
                    self._hand_off_on = loop
                elif self._hand_off_on is not loop and self._linger_on is not loop:
                    # Nobody waits for this one (an outcome): it lingers up to `LINGER_S` to share the
                    # next write (see `_hand_off`), without a hand-off of its own at the end of the turn.
                    linger = True
                    self._linger_on = loop
            else:
                batch, self._outbox = self._outbox, []
                if self._journal_path is None:
                    self._queue.put(batch)
                    return
        if loop is None:
            self._append(batch)
        elif schedule:
            # Once per turn of the loop: records queued in one turn share one write (and one wake-up).
            loop.call_soon(self._hand_off)
        elif linger:
            loop.call_later(LINGER_S, self._linger_over)

    def _hand_off(self) -> None:
        with self._lock:
            self._hand_off_on = None
            waited = any(p.future is not None for p in self._outbox)
            if not waited and len(self._outbox) < self._batch_max:
                # Records nobody waits for (outcomes) linger up to `LINGER_S`, so that they share the
                # next write (usually the next call's decision) instead of paying for one of their
                # own: one journal write, or one commit, per call when calls come one at a time.
                # (`_put` starts their timer; here, those whose waited company another loop took.)
                loop = asyncio.get_running_loop()
                if self._outbox and self._linger_on is not loop:
                    self._linger_on = loop
                    loop.call_later(LINGER_S, self._linger_over)
                return
            batch, self._outbox = self._outbox, []
            if self._journal_path is None:
                self._queue.put(batch)
                return
        self._append(batch)

    def _linger_over(self) -> None:
        with self._lock:
            self._linger_on = None
            batch, self._outbox = self._outbox, []
            if not batch:
                return
            if self._journal_path is None:
                self._queue.put(batch)
                return
        self._append(batch)

    def _start_thread(self) -> None:
        # Called with `_lock` held.
        target = self._ingest_loop if self._journal_path is not None else self._run
        self._thread = threading.Thread(target=target, name="audit-writer", daemon=True)
        self._thread.start()

    def _chained(self, records: Sequence[AuditRecord]) -> tuple[list[dict[str, Any]], bytes, int, str]:
        """The stored rows of `records`, chained after the head (which this does not move), their
        journal lines, and the new head."""
        seq, prev = self._head
        rows = []
        lines = []
        for record in records:
            seq += 1
            row = _stored(record, self.chain, seq, prev)
            canonical = orjson.dumps(row)  # sorted keys already: what `record_hash` hashes
            row["hash"] = prev = hashlib.sha256(canonical).hexdigest()
            rows.append(row)
            # The journal line is the canonical JSON with the hash as its last member.
            lines.append(b'%s,"hash":"%s"}\n' % (canonical[:-1], prev.encode()))
        return rows, b"".join(lines), seq, prev

    # --- the journal (SQLite with `durability: crash`) ---
    def _append(self, batch: list[_Pending]) -> None:
        """Append the records of `batch` to the journal with one write, and answer their waiters now.

        The rows go to the ingest thread without waking it, unless a flush waits or the backlog is
        large. A failed write, a failing ingest or too long a backlog refuses every record of the batch.
        """
        pendings: list[_Pending] = []
        records: list[AuditRecord] = []
        barriers: list[_Pending] = []
        for pending in batch:
            if pending.record is None:
                barriers.append(pending)
            else:
                pendings.append(pending)
                records.append(pending.record)
        error: Unavailable | None = None
        rows: list[dict[str, Any]] = []
        with self._append_lock:
            journal = self._journal
            if pendings:
                error = self._refusal()
                if error is None and journal is not None:
                    rows, data, seq, head = self._chained(records)
                    try:
                        journal.append(data, seq)
                    except OSError as exc:
                        log.error("audit log: %d records not written to the journal: %s", len(rows), exc)
                        error = _unavailable(_CANNOT_RECORD, exc)
                        rows = []
                    else:
                        self._head = (seq, head)
            with self._lock:
                self._rows += rows
                self._journaled += len(rows)
                waiting = [(self._journaled, b) for b in barriers] if self._journaled > self._ingested else []
                self._barriers += waiting
                wake = bool(waiting) or self._journaled - self._ingested >= self._batch_max
        if wake:
            self._ingest_wake.set()
        _settle(pendings, error)
        if barriers and not waiting:
            _settle(barriers, None)  # nothing is waiting to be ingested

    def problem(self) -> str | None:
        """Why the log refuses records now (the journal, the database, the backlog), or None."""
        refusal = self._refusal()
        return refusal.message if refusal is not None else None

    def backlog(self) -> int | None:
        """Records in the journal not yet committed to SQL (the ingest's lag), or None without a journal
        (then a record is committed before its writer hears back)."""
        if self._journal_path is None:
            return None
        with self._lock:
            return self._journaled - self._ingested

    def _refusal(self) -> Unavailable | None:
        if self._journal is None:
            return _unavailable(f"{_CANNOT_RECORD} (the journal could not be opened)")
        if self._failing:
            return _unavailable(f"{_CANNOT_RECORD} (the database does not take records)")
        if self._journaled - self._ingested >= BACKLOG_MAX:
            return _unavailable(f"{_CANNOT_RECORD} (the database is {BACKLOG_MAX} records behind)")
        return None

    def _ingest_loop(self) -> None:
        """The ingest thread: every `INGEST_EVERY_S` (at once for a flush or close), commit what is
        journaled, then release the flushes it satisfied and delete the segments it covered."""
        held: list[dict[str, Any]] = []
        idle_since: float | None = None
        timeout = INGEST_EVERY_S
        while True:
            self._ingest_wake.wait(timeout)
            self._ingest_wake.clear()
            with self._lock:
                held += self._rows
                self._rows = []
                stopping = self._stopping
            if held:
                self._taken = (held[-1]["seq"], held[-1]["hash"])
            # Signed once the rows are durable in the journal, before SQL has them: rows lost from
            # the journal before they reach SQL are then caught as well.
            self._maybe_checkpoint(*self._taken)
            error: Exception | None = None
            if held:
                idle_since = None
                error = self._ingest(held)
                if error is not None and not self._failing:
                    log.error("audit log: ingest failed; records are refused until it works: %s", error)
                elif error is None and self._failing:
                    log.warning("audit log: ingest works again; records are accepted")
                self._failing = error is not None
                if error is None:
                    self._store_checkpoints(self._ingested)
                self._remove_ingested_segments()
                if error is None and self._retention_days is not None:
                    self._maybe_prune()
            elif idle_since is None:
                idle_since = time.monotonic()
            elif idle_since > 0 and time.monotonic() - idle_since >= CHECKPOINT_EVERY_S:
                self._checkpoint()
                idle_since = -1.0  # once per idle spell
            self._release_barriers(failed=error is not None)
            if stopping:
                break
            timeout = RETRY_S if error is not None else INGEST_EVERY_S
        self._checkpoint()

    def _ingest(self, held: list[dict[str, Any]]) -> Exception | None:
        """Commit `held` in transactions of at most `batch_max` rows; remove what was committed."""
        done = 0
        try:
            conn = self._ingest_connection()
            while done < len(held):
                part = held[done : done + self._batch_max]
                self._commit_rows(conn, part)
                done += len(part)
                self._chain_written = True
                self.commits += 1
                with self._lock:
                    self._ingested += len(part)
        except Exception as exc:  # whatever it was, the thread must live on and retry
            self._drop_ingest_connection()
            return exc
        finally:
            del held[:done]
        return None

    def _commit_rows(self, conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute("BEGIN IMMEDIATE")  # waits for the lock (busy_timeout), in this thread only
        try:
            if not self._chain_written:
                conn.execute(_CHAIN_SQL, self._chain_row())
            # Short GIL holds: the rows come ready; bind them in chunks and let the loop run between.
            for start in range(0, len(rows), INGEST_CHUNK):
                part = rows[start : start + INGEST_CHUNK]
                conn.execute(_INSERT_CHUNK_SQL[len(part)], [row[c] for row in part for c in _INSERT_COLUMNS])
                time.sleep(0)
            conn.execute(_ADVANCE_SQL, (rows[-1]["seq"], rows[-1]["hash"], self.chain))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _release_barriers(self, *, failed: bool) -> None:
        # A failed ingest releases every flush too: its rows are retried, but a reader must not hang.
        with self._lock:
            done = [b for n, b in self._barriers if failed or n <= self._ingested]
            self._barriers = [(n, b) for n, b in self._barriers if not failed and n > self._ingested]
        if done:
            _settle(done, None)

    def _remove_ingested_segments(self) -> None:
        journal = self._journal
        if journal is not None:
            with self._lock:
                committed = self._ingested  # rows go in chain order from seq 1: the committed seq
            journal.remove_ingested(committed)

    def _ingest_connection(self) -> sqlite3.Connection:
        # The driver's own connection, outside SQLAlchemy and its pool: per statement it adds nothing
        # but sqlite3's own binding, so the thread's GIL holds stay short.
        if self._ingest_conn is None:
            conn = sqlite3.connect(str(self._sqlite_path), isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={BUSY_TIMEOUT_MS}"):
                conn.execute(f"PRAGMA {pragma}")
            self._ingest_conn = conn
        return self._ingest_conn

    def _drop_ingest_connection(self) -> None:
        if self._ingest_conn is not None:
            try:
                self._ingest_conn.close()
            except sqlite3.Error:
                log.debug("audit log: closing a broken connection failed", exc_info=True)
            self._ingest_conn = None

    def _checkpoint(self) -> None:
        # A WAL checkpoint flushes to disk: this thread runs it when idle, PASSIVE, which neither
        # waits for nor blocks the writers.
        try:
            self._ingest_connection().execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            log.warning("audit log: WAL checkpoint failed; the next one tries again", exc_info=True)
            self._drop_ingest_connection()

    # --- checkpoints (decision 0215): by the thread that stores the records, and at close ---
    def _maybe_checkpoint(self, seq: int, head: str, *, last: bool = False) -> None:
        """Sign this chain's head at `seq` if a checkpoint is due: `every_records` records or
        `every_s` seconds after the previous one; always if `last` (the chain ends there)."""
        checkpointer = self._checkpointer
        if checkpointer is None or seq == 0:
            return
        signed_seq, signed_at = self._signed
        now = time.monotonic()
        if not last and (
            seq == signed_seq
            or (seq - signed_seq < checkpointer.every_records and now - signed_at < checkpointer.every_s)
        ):
            return
        self._unstored.append(checkpointer.sign("head", self.chain, seq, head, last=last))
        self._signed = (seq, now)

    def _store_checkpoints(self, committed_seq: int) -> None:
        """Insert the signed checkpoints whose records are committed, so that a reader of the database
        alone finds every record a checkpoint there names; a failure retries with the next ones."""
        ready = [c for c in self._unstored if c.seq <= committed_seq]
        if not ready:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(audit_checkpoint), [_checkpoint_row(c) for c in ready])
        except SQLAlchemyError:
            log.warning(
                "audit log: checkpoints not stored in the database (the sink has them)", exc_info=True
            )
            return
        self._unstored = [c for c in self._unstored if c.seq > committed_seq]

    # --- the writer thread (PostgreSQL, or `durability: power`) ---
    def _run(self) -> None:
        every_s = self._checkpointer.every_s if self._checkpointer is not None else None
        while True:
            try:
                item = self._queue.get(timeout=every_s)
            except queue.Empty:  # idle: sign what the last batches committed, if it is time
                self._checkpoint_committed()
                continue
            if item is None:
                break
            batch, stopping = self._gather(list(item))
            for start in range(0, len(batch), self._batch_max):
                part = batch[start : start + self._batch_max]
                records = [p.record for p in part if p.record is not None]
                self._committing_since = time.monotonic()
                error = self._commit(records) if records else None
                self._committing_since = None
                _settle(part, error)
                self._checkpoint_committed()
                if error is None and self._retention_days is not None:
                    self._maybe_prune()
            if stopping:
                break

    def _checkpoint_committed(self) -> None:
        self._maybe_checkpoint(*self._head)
        self._store_checkpoints(self._head[0])

    def _gather(self, batch: list[_Pending]) -> tuple[list[_Pending], bool]:
        """More of what is queued, for one transaction, and whether the log is closing."""
        while len(batch) < self._batch_max:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.extend(more)
        return batch, False

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self.engine.connect()
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"PRAGMA synchronous={self._synchronous}")
                conn.commit()
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                log.debug("audit log: closing a broken connection failed", exc_info=True)
            self._conn = None

    def _commit(self, records: Sequence[AuditRecord]) -> Unavailable | None:
        try:
            if self._head_unsure:
                self._reread_head()
            rows, _, seq, head = self._chained(records)
            if not self._chain_written:
                create_audit_tables(self.engine)
            self._write(rows, seq, head)
        except Exception as exc:  # whatever it was, the writer thread must live on and answer
            log.error("audit log: %d records not written: %s", len(records), exc)
            self._drop_connection()
            # The connection may have broken after the server committed: the next batch goes after
            # the head the database holds, not the one this process last heard of.
            self._head_unsure = True
            return _unavailable(_CANNOT_RECORD, exc)
        self._head = (seq, head)
        self._chain_written = True
        self.commits += 1
        return None

    def _reread_head(self) -> None:
        conn = self._connection()
        try:
            row = conn.execute(
                select(audit_chain.c.head_seq, audit_chain.c.head_hash).where(
                    audit_chain.c.chain == self.chain
                )
            ).first()
        finally:
            conn.rollback()
        if row is not None:
            self._head = (int(row.head_seq), str(row.head_hash))
            self._chain_written = True
        self._head_unsure = False

    def _chain_row(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "node": self.node,
            "started_at": timestamp(self._clock()),
            "head_seq": 0,
            "head_hash": GENESIS,
            "anchor_seq": 0,
            "anchor_hash": GENESIS,
        }

    def _write(self, rows: list[dict[str, Any]], seq: int, head: str) -> None:
        conn = self._connection()
        try:
            if not self._chain_written:
                conn.execute(insert(audit_chain).values(**self._chain_row()))
            conn.execute(_INSERT, rows)
            conn.execute(_ADVANCE, {"of_chain": self.chain, "to_seq": seq, "to_hash": head})
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._pruned_at < PRUNE_EVERY_S or self._retention_days is None:
            return
        self._pruned_at = now
        try:
            removed = prune(self.engine, timestamp(now - self._retention_days * 86400), self._checkpointer)
        except SQLAlchemyError:
            log.exception("audit log: retention pruning failed")
            return
        if removed:
            log.info("audit log: retention removed %d records", removed)


# --- the journal ----------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _chain_id(chain: str) -> str:
    """A chain's name as a file name: no dots, so `<id>.<n>.jsonl` and `<id>.lock` parse back."""
    return _UNSAFE.sub("_", chain)


class _Journal:
    """One process's journal: a lock file held for the log's life, and numbered segments of JSON lines.

    The event loop appends (`append`, one `os.write` per batch) and rotates; the ingest thread removes
    the segments every row of which is committed (`remove_ingested`).
    """

    def __init__(self, directory: Path, chain: str) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        self.directory = directory
        self.id = _chain_id(chain)
        self.lock_path = directory / f"{self.id}.lock"
        # Locked before it gets its name: a replay never sees this lock free (and takes it) while
        # this process lives.
        hidden = directory / f".{self.id}.lock.new"
        self._lock_fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.rename(hidden, self.lock_path)
        self._number = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._last_seq = 0
        self._mutex = threading.Lock()  # the loop retires segments, the thread removes them
        self._retired: list[tuple[Path, int]] = []  # closed segments and the last seq each holds

    def append(self, data: bytes, last_seq: int) -> None:
        """Append `data` (whole lines of rows up to `last_seq`) with one write.

        Raises:
            OSError: the write failed or was short; the segment is cut back and the next append
                starts a new one, so no torn line is followed by others.
        """
        if self._fd is None or self._size >= SEGMENT_BYTES:
            self._rotate()
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write to the audit journal ({written} of {len(data)} bytes)")
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.warning("audit log: cannot cut back the journal segment %s", self._path, exc_info=True)
            self._retire()
            raise
        self._size += written
        self._last_seq = last_seq

    def _rotate(self) -> None:
        if self._fd is not None:
            self._retire()
        self._number += 1
        path = self.directory / f"{self.id}.{self._number}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._path = path
        self._size = os.fstat(self._fd).st_size

    def _retire(self) -> None:
        assert self._fd is not None and self._path is not None
        try:
            os.close(self._fd)
        except OSError:
            log.debug("audit log: closing a journal segment failed", exc_info=True)
        with self._mutex:
            self._retired.append((self._path, self._last_seq))
        self._fd = self._path = None

    def remove_ingested(self, committed_seq: int) -> None:
        """Delete the closed segments every row of which is committed (seq at or below `committed_seq`)."""
        with self._mutex:
            done = [path for path, last in self._retired if last <= committed_seq]
            self._retired = [(path, last) for path, last in self._retired if last > committed_seq]
        for path in done:
            _unlink(path)

    def close(self, *, remove: bool) -> None:
        """Close the files; with `remove` (everything committed), delete the segments, then the lock."""
        if self._fd is not None:
            self._retire()
        if remove:
            with self._mutex:
                done, self._retired = [path for path, _ in self._retired], []
            for path in done:
                _unlink(path)
            _unlink(self.lock_path)
        os.close(self._lock_fd)  # releases the lock: a later start replays what is left


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("audit log: cannot delete %s", path, exc_info=True)


class _Unreadable(Exception):
    """A journal line that cannot be replayed: the chain's replay stops there."""


def replay_journals(database: str, directory: Path, checkpointer: Checkpointer | None = None) -> int:
    """Ingest the journals of dead processes in `directory` into the SQLite `database`; returns rows.

    A journal is replayed only if its lock can be taken (its process is gone); rows already ingested
    (at or below the chain's head) are skipped, the rest must continue the chain. A torn last line
    of a segment (its write never completed, so its caller was never answered) is dropped with a
    warning; anything else that does not fit stops that chain's replay there, and its files are
    renamed `*.unreadable` for an operator. Replayed journals are deleted. With a `checkpointer`,
    a chain replayed whole gets its final checkpoint: its process is gone and cannot sign it.
    """
    if not directory.is_dir():
        return 0
    replayed = 0
    for lock_path in sorted(directory.glob("*.lock")):
        chain_id = lock_path.name.removesuffix(".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue  # replayed by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's journal: never touched
            try:
                if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                    continue  # replayed and removed by another process while this one waited
            except FileNotFoundError:
                continue
            replayed += _replay_chain(database, directory, chain_id, lock_path, checkpointer)
        finally:
            os.close(fd)
    return replayed


def _segments(directory: Path, chain_id: str) -> list[Path]:
    numbered = []
    for path in directory.glob(f"{chain_id}.*.jsonl"):
        number = path.name[len(chain_id) + 1 : -len(".jsonl")]
        if number.isdigit():
            numbered.append((int(number), path))
    return [path for _, path in sorted(numbered)]


def _replay_chain(
    database: str, directory: Path, chain_id: str, lock_path: Path, checkpointer: Checkpointer | None
) -> int:
    segments = _segments(directory, chain_id)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        rows, problem, end = _read_journal(conn, segments)
        if rows:
            first = rows[0]
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute(_HEAD_SQL, (first["chain"],)).fetchone() is None:
                    chain_row = {
                        "chain": first["chain"],
                        "node": first["chain"].rpartition(":")[0] or first["chain"],
                        "started_at": first["time"],
                        "head_seq": 0,
                        "head_hash": GENESIS,
                        "anchor_seq": 0,
                        "anchor_hash": GENESIS,
                    }
                    conn.execute(_CHAIN_SQL, chain_row)
                conn.executemany(_INSERT_SQL, rows)
                conn.execute(_ADVANCE_SQL, (rows[-1]["seq"], rows[-1]["hash"], first["chain"]))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if checkpointer is not None and problem is None and end is not None and end[1] > 0:
            final = checkpointer.sign("head", end[0], end[1], end[2], last=True)
            try:
                conn.execute(_CHECKPOINT_SQL, _checkpoint_row(final))
            except sqlite3.Error:
                log.warning("audit log: a replayed chain's checkpoint is only in the sink", exc_info=True)
    finally:
        conn.close()
    if rows:
        log.warning(
            "audit log: replayed %d records of chain %r from its journal", len(rows), rows[0]["chain"]
        )
    if problem is not None:
        log.error("audit log: journal replay stopped: %s; its files are renamed *.unreadable", problem)
        for path in [*segments, lock_path]:
            os.replace(path, path.with_name(path.name + ".unreadable"))
    else:
        for path in segments:
            _unlink(path)
        _unlink(lock_path)
    return len(rows)


def _read_journal(
    conn: sqlite3.Connection, segments: list[Path]
) -> tuple[list[dict[str, Any]], str | None, tuple[str, int, str] | None]:
    """The rows of `segments` that continue their chain past its committed head, the problem that
    stopped the reading (None: all of it was read), and the chain's head after them (None: no line)."""
    rows: list[dict[str, Any]] = []
    head: tuple[int, str] | None = None  # the chain's last seq and hash
    chain: str | None = None
    for path in segments:
        lines = path.read_bytes().split(b"\n")
        torn = lines.pop()  # b"" after a final newline; else a write the crash cut short
        if torn:
            log.warning("audit log: dropped a torn last line of %s (its call was never answered)", path)
        for number, line in enumerate(lines, 1):
            try:
                row = orjson.loads(line)
                if chain is None:
                    chain = row["chain"]
                    found = conn.execute(_HEAD_SQL, (chain,)).fetchone()
                    head = (int(found[0]), str(found[1])) if found is not None else (0, GENESIS)
                assert head is not None
                if row["chain"] != chain:
                    raise _Unreadable(f"chain {row['chain']!r} in the journal of {chain!r}")
                if row["seq"] <= head[0] and not rows:
                    continue  # ingested before the process died
                if row["seq"] != head[0] + 1 or row["prev_hash"] != head[1]:
                    raise _Unreadable(f"seq {row['seq']} does not continue the chain at seq {head[0]}")
                if record_hash(row) != row["hash"]:
                    raise _Unreadable(f"seq {row['seq']} does not match its hash")
            except (orjson.JSONDecodeError, KeyError, TypeError, _Unreadable) as exc:
                return rows, f"{path} line {number}: {exc}", None
            rows.append(row)
            head = (row["seq"], row["hash"])
    return rows, None, (chain, *head) if chain is not None and head is not None else None


def prune(engine: Engine, before: str, checkpointer: Checkpointer | None = None) -> int:
    """Delete records older than `before` (a `timestamp`), moving each chain's anchor; returns how many.

    Records go in chain order up to the last one older than `before`, so that a chain never has a
    hole: what remains starts right after its anchor. The `checkpointer` signs each new anchor
    (into its sink before the database has it), without which `verify` holding the chains to their
    checkpoints finds the oldest records removed; checkpoints below the anchor are dropped.
    """
    removed = 0
    with engine.begin() as conn:
        chains = conn.execute(select(audit_chain.c.chain)).scalars().all()
        for chain in chains:
            last = conn.execute(
                select(audit_log.c.seq, audit_log.c.hash)
                .where(audit_log.c.chain == chain, audit_log.c.time < before)
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            ).first()
            if last is None:
                continue
            result = conn.execute(
                delete(audit_log).where(audit_log.c.chain == chain, audit_log.c.seq <= last.seq)
            )
            removed += result.rowcount
            if checkpointer is not None:
                anchor = checkpointer.sign("anchor", chain, last.seq, last.hash)
                conn.execute(insert(audit_checkpoint).values(**_checkpoint_row(anchor)))
            conn.execute(
                delete(audit_checkpoint).where(
                    audit_checkpoint.c.chain == chain, audit_checkpoint.c.seq < last.seq
                )
            )
            conn.execute(
                update(audit_chain)
                .where(audit_chain.c.chain == chain, audit_chain.c.anchor_seq < last.seq)
                .values(anchor_seq=last.seq, anchor_hash=last.hash)
            )
    return removed


# --- reading --------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EARLIEST = 0.0  # no record is older than the Unix epoch


def parse_time(text: str, now: float | None = None) -> str:
    """A time filter as a `timestamp`: ISO 8601 (`2026-05-01T10:00:00Z`) or an age (`15m`, `2h`, `7d`).

    Raises:
        ValueError: neither form.
    """
    try:
        match = _RELATIVE.match(text.strip())
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
            # An age beyond the oldest possible record means "from the start".
            return timestamp(max((time.time() if now is None else now) - seconds, _EARLIEST))
        # RFC 3339 allows a lower-case `t` and `z`; `fromisoformat` takes only upper case.
        moment = datetime.fromisoformat(text.strip().upper())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return timestamp(moment.timestamp())
    except (ValueError, OverflowError, OSError) as exc:  # OSError: beyond the platform's time_t
        raise ValueError(
            f"invalid time {text!r}: use ISO 8601 (2026-05-01T10:00:00Z) or an age (15m, 2h, 7d)"
        ) from exc


@dataclass(slots=True)
class AuditQuery:
    """Filters; every one that is set must hold. `resource` takes a trailing `*` for a prefix."""

    since: str | None = None  # timestamp(), inclusive
    until: str | None = None  # timestamp(), exclusive
    subject: str | None = None
    actor: str | None = None
    client: str | None = None
    protocol: str | None = None
    resource: str | None = None
    decision: str | None = None
    run_id: str | None = None
    request_id: str | None = None
    event: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        c = audit_log.c
        out: list[ColumnElement[bool]] = []
        if self.since:
            out.append(c.time >= self.since)
        if self.until:
            out.append(c.time < self.until)
        for value, column in (
            (self.subject, c.subject),
            (self.client, c.client_id),
            (self.protocol, c.protocol),
            (self.decision, c.decision),
            (self.run_id, c.run_id),
            (self.request_id, c.request_id),
            (self.event, c.event),
        ):
            if value:
                out.append(column == value)
        if self.actor:
            out.append(c.actors.contains(orjson.dumps(self.actor).decode(), autoescape=True))
        if self.resource:
            if self.resource.endswith("*"):
                out.append(c.resource.startswith(self.resource[:-1], autoescape=True))
            else:
                out.append(c.resource == self.resource)
        return out


def _public(row: Mapping[Any, Any]) -> dict[str, Any]:
    # Column keys are str subclasses (quoted_name); plain str keeps every JSON encoder happy.
    out = {str(k): v for k, v in row.items()}
    for name in _LIST_COLUMNS:
        out[name] = orjson.loads(out[name])
    if out.get("arguments") is not None:
        out["arguments"] = orjson.loads(out["arguments"])
    return out


def query(
    engine: Engine,
    filters: AuditQuery,
    *,
    limit: int = 100,
    after_id: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Records matching `filters`, oldest first (or newest first), at most `limit`, after `after_id`."""
    stmt = select(audit_log).where(and_(True, *filters.where()))
    if after_id is not None:
        stmt = stmt.where(audit_log.c.id < after_id if newest_first else audit_log.c.id > after_id)
    stmt = stmt.order_by(audit_log.c.id.desc() if newest_first else audit_log.c.id).limit(limit)
    with engine.connect() as conn:
        return [_public(r._mapping) for r in conn.execute(stmt)]


def iter_records(engine: Engine, filters: AuditQuery, *, page: int = 1000) -> Iterator[dict[str, Any]]:
    """Every record matching `filters`, oldest first, read a page at a time (for export)."""
    after = 0
    while True:
        rows = query(engine, filters, limit=page, after_id=after)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1]["id"]


_SEVERITY = {"allowed": (9, "INFO"), "denied": (13, "WARN"), "error": (17, "ERROR")}


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": k, "value": _any_value(v)} for k, v in value.items()]}}
    return {"stringValue": str(value)}


def otel_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as an OpenTelemetry log record (OTLP/JSON `LogRecord`), attributes `agentgw.*`."""
    moment = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    nanos = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    number, text = _SEVERITY.get(record["decision"], (9, "INFO"))
    body = f"{record['decision']} {record['action']} {record['resource']} by {record['subject'] or 'unknown'}"
    skip = {"time", "trace_id"}
    attributes = [
        {"key": f"agentgw.{k}", "value": _any_value(v)}
        for k, v in record.items()
        if k not in skip and v is not None and v != []
    ]
    out: dict[str, Any] = {
        "timeUnixNano": str(nanos),
        "observedTimeUnixNano": str(nanos),
        "severityNumber": number,
        "severityText": text,
        "eventName": f"agentgw.audit.{record['event']}",
        "body": {"stringValue": body},
        "attributes": attributes,
    }
    if record.get("trace_id"):
        out["traceId"] = record["trace_id"]
    return out


# --- verify ---------------------------------------------------------------------------------------

# forged: a checkpoint not signed by a trusted key; unreadable: a file `verify` must read cannot be,
# or one a journal replay gave up on is left.
ProblemKind = Literal["edited", "removed", "inserted", "forged", "unreadable"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with the log."""

    kind: ProblemKind
    chain: str  # "" when no chain is named
    record_id: int | None  # the record named; None when records at a chain's end are gone
    seq: int | None
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    records: int
    chains: int
    problem: Problem | None
    checkpoints: int = 0  # checkpoint signatures checked (a sink's line and its database copy: two)
    unproven: int = 0  # records after their chain's newest checkpoint: the window no signature covers
    pending: int = 0  # records only in a journal so far (a live gateway ingests them within moments)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(engine: Engine, trust: CheckpointTrust | None = None) -> VerifyReport:
    """Walk every chain and report the first record that was edited, removed or inserted.

    With `trust` the chains are also held to every checkpoint signed by a trusted key, from its sinks
    and the database (decision 0215): recomputed hashes, a truncated tail with its head moved back, a
    chain deleted with its head, the oldest records removed without a signed prune are found, up to
    the newest checkpoint of each chain. A SQLite database's journal is checked as well: its lines
    must match their hashes and the database, and a file a replay gave up on (`*.unreadable`) fails.

    Reads checkpoints first, then the journal, then the chains: a live gateway only adds to what was
    read before, so nothing it checkpointed can be missed in between.
    """
    signed: dict[str, _Claims] = {}
    problem, missing_sink = _read_checkpoints(engine, trust, signed) if trust is not None else (None, None)
    journaled: dict[str, dict[int, str]] = {}
    directory = journal_directory(engine)
    if problem is None and directory is not None:
        problem = _read_journals(directory, journaled)
    # What a record's hash must be, and who says so: the chain's newest checkpoint, its journal line.
    expected: dict[str, dict[int, list[tuple[str, str]]]] = {}
    for chain, lines in journaled.items():
        expected[chain] = {seq: [(hash_, "its line in the journal")] for seq, hash_ in lines.items()}
    for chain, claims in signed.items():
        for c in [claims.newest, *claims.rivals] if claims.newest is not None else ():
            expected.setdefault(chain, {}).setdefault(c.seq, []).append(
                (c.hash, f"the checkpoint signed at {c.time}")
            )
    with engine.connect() as conn:
        heads = {r.chain: r for r in conn.execute(select(audit_chain))}
        if problem is not None:
            return VerifyReport(0, len(heads), problem)
        rows = conn.execution_options(yield_per=1000).execute(
            select(audit_log).order_by(audit_log.c.chain, audit_log.c.seq, audit_log.c.id)
        )
        try:
            checked, seen, problem = _walk((r._mapping for r in rows), heads, expected)
        finally:
            rows.close()  # stopping at the first problem leaves a server-side cursor open otherwise
    if problem is None:
        for chain, head in heads.items():
            if chain not in seen and head.head_seq > head.anchor_seq:
                span = f"seq {head.anchor_seq + 1} to {head.head_seq}"
                message = f"every record of chain {chain!r} ({span}) was removed"
                problem = Problem("removed", chain, None, head.anchor_seq + 1, message)
                break
    if problem is None and missing_sink is not None and signed:
        # A gateway that signs checkpoints creates its sink at start; missing, it was removed (or
        # this is another host: pass the sinks to read).
        problem = Problem("unreadable", "", None, None, f"the checkpoint sink {missing_sink} is missing")
    pending = sum(
        sum(1 for seq in lines if chain not in heads or seq > heads[chain].head_seq)
        for chain, lines in journaled.items()
    )
    unproven = 0
    if trust is not None:
        held, unproven = _held_to_checkpoints(heads, signed, journaled)
        problem = problem or held
    count = sum(c.count for c in signed.values())
    return VerifyReport(checked, len(heads), problem, count, unproven, pending)


@dataclass(slots=True)
class _Claims:
    """What the trusted checkpoints of one chain say, kept to what `verify` needs, so that its memory
    does not grow with them: the chain links every earlier record to the newest checkpoint's."""

    newest: Checkpoint | None = None  # the head checkpoint of the highest seq
    rivals: list[Checkpoint] = field(default_factory=list)  # of the same seq, another hash: a lie
    final: Checkpoint | None = None  # the final checkpoint of the lowest seq
    anchors: set[tuple[int, str]] = field(default_factory=set)  # (seq, hash) of the signed anchors
    count: int = 0

    def add(self, c: Checkpoint) -> None:
        self.count += 1
        if c.kind == "anchor":
            self.anchors.add((c.seq, c.hash))
            return
        if self.newest is None or c.seq > self.newest.seq:
            self.newest, self.rivals = c, []
        elif c.seq == self.newest.seq and c.hash != self.newest.hash and len(self.rivals) < 8:
            self.rivals.append(c)
        if c.last and (self.final is None or c.seq < self.final.seq):
            self.final = c


def _read_checkpoints(
    engine: Engine, trust: CheckpointTrust, signed: dict[str, _Claims]
) -> tuple[Problem | None, Path | None]:
    """Collect the checkpoints of the sinks and the database into `signed`; the first problem, and
    a sink that does not exist (a problem if there are checkpoints at all)."""
    missing: Path | None = None
    for sink in trust.sinks:
        try:
            for checkpoint in read_sink(sink, trust.keys):
                signed.setdefault(checkpoint.chain, _Claims()).add(checkpoint)
        except FileNotFoundError:
            missing = missing or sink
        except OSError as exc:
            return Problem(
                "unreadable", "", None, None, f"the checkpoint sink {sink} cannot be read: {exc}"
            ), None
        except ValueError as exc:
            return Problem("forged", "", None, None, str(exc)), None
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(
            select(audit_checkpoint).order_by(audit_checkpoint.c.id)
        )
        for row in rows:
            try:
                checkpoint = parse_checkpoint(row.body, trust.keys)
            except ValueError as exc:
                rows.close()
                where = f"checkpoint {row.id} in the database (chain {row.chain!r}, seq {row.seq})"
                return Problem(
                    "forged", row.chain, None, row.seq, f"{where} is not to be trusted: {exc}"
                ), None
            signed.setdefault(checkpoint.chain, _Claims()).add(checkpoint)
    return None, missing


def _read_journals(directory: Path, journaled: dict[str, dict[int, str]]) -> Problem | None:
    """Read every journal segment in `directory` into `journaled` (chain -> seq -> hash); the first
    line that does not match its hash or its predecessor, or a file a replay gave up on."""
    try:
        names = sorted(path.name for path in directory.iterdir())
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Problem("unreadable", "", None, None, f"the journal {directory} cannot be read: {exc}")
    for name in names:
        if name.endswith(".unreadable"):
            why = "a journal replay stopped there, and the records after that point are not in the database"
            return Problem(
                "unreadable", "", None, None, f"{directory / name} is left: {why} (see the gateway's log)"
            )
    for chain_id in sorted({name.split(".")[0] for name in names if name.endswith(".jsonl")}):
        previous: tuple[int, str] | None = None
        for path in _segments(directory, chain_id):
            try:
                lines = path.read_bytes().split(b"\n")
            except FileNotFoundError:  # ingested and deleted meanwhile: the next one starts later
                previous = None
                continue
            except OSError as exc:
                return Problem(
                    "unreadable", "", None, None, f"the journal segment {path} cannot be read: {exc}"
                )
            lines.pop()  # b"" after the last newline, or a write still under way
            for number, line in enumerate(lines, 1):
                where = f"line {number} of the journal segment {path}"
                try:
                    row = orjson.loads(line)
                    chain, seq, prev_hash, hash_ = row["chain"], row["seq"], row["prev_hash"], row["hash"]
                    edited = record_hash(row) != hash_
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    return Problem("edited", "", None, None, f"{where} is not a record: it was edited")
                if edited:
                    why = "was edited: its content does not match its hash"
                    return Problem("edited", chain, None, seq, f"{where} (chain {chain!r}, seq {seq}) {why}")
                if previous is not None and seq > previous[0] + 1:
                    why = f"seq {previous[0] + 1} to {seq - 1} of chain {chain!r} were removed before it"
                    return Problem("removed", chain, None, previous[0] + 1, f"{where}: {why}")
                if previous is not None and (seq != previous[0] + 1 or prev_hash != previous[1]):
                    why = "does not follow from its predecessor's hash: it was edited or inserted"
                    return Problem("edited", chain, None, seq, f"{where} (chain {chain!r}, seq {seq}) {why}")
                journaled.setdefault(chain, {})[seq] = hash_
                previous = (seq, hash_)
    return None


def _held_to_checkpoints(
    heads: Mapping[str, Any], signed: Mapping[str, _Claims], journaled: Mapping[str, Mapping[int, str]]
) -> tuple[Problem | None, int]:
    """What the records walk cannot see: checkpointed records gone from the database and the
    journal, chains gone with their head, anchors nobody signed, records after a final checkpoint.
    Returns the first problem and how many records no checkpoint covers yet."""
    unproven = 0
    for chain, head in heads.items():
        claims = signed.get(chain, _Claims())
        lines = journaled.get(chain, {})
        if head.anchor_seq > 0 and (head.anchor_seq, head.anchor_hash) not in claims.anchors:
            why = f"no anchor signed by a trusted key vouches for seq {head.anchor_seq}"
            message = f"the oldest records of chain {chain!r} (to seq {head.anchor_seq}) were removed: {why}"
            return Problem("removed", chain, None, head.anchor_seq, message), unproven
        reach = head.head_seq  # the database's head, and after it what the journal still holds
        while reach + 1 in lines:
            reach += 1
        newest = claims.newest if claims.newest is not None and claims.newest.seq > head.anchor_seq else None
        if newest is not None and newest.seq > reach:
            why = f"a checkpoint signed at {newest.time} vouches for seq {newest.seq}"
            message = (
                f"the newest record(s) of chain {chain!r} (seq {reach + 1} to {newest.seq}) were removed, "
                f"from the database and the journal, and its head moved back: {why}"
            )
            return Problem("removed", chain, None, reach + 1, message), unproven
        if newest is not None and newest.seq > head.head_seq and lines[newest.seq] != newest.hash:
            message = (
                f"seq {newest.seq} of chain {chain!r} in the journal is not the one signed at {newest.time}"
            )
            return Problem("edited", chain, None, newest.seq, message), unproven
        final = claims.final
        if final is not None and head.head_seq > final.seq:
            message = (
                f"records seq {final.seq + 1} to {head.head_seq} of chain {chain!r} were inserted "
                f"after its final checkpoint (seq {final.seq})"
            )
            return Problem("inserted", chain, None, final.seq + 1, message), unproven
        if final is None:
            unproven += head.head_seq - max(head.anchor_seq, newest.seq if newest is not None else 0)
    for chain, claims in sorted(signed.items()):
        if chain in heads:
            continue
        c = claims.newest
        if claims.anchors or (c is not None and journaled.get(chain, {}).get(c.seq) != c.hash):
            vouched = (
                f"a checkpoint signed at {c.time} vouches for its records up to seq {c.seq}"
                if c
                else "it was pruned"
            )
            message = f"chain {chain!r} was removed, its head included: {vouched}"
            return Problem("removed", chain, None, None, message), unproven
    return None, unproven


def _walk(
    rows: Iterator[Mapping[Any, Any]],
    heads: Mapping[str, Any],
    expected: Mapping[str, Mapping[int, list[tuple[str, str]]]],
) -> tuple[int, set[str], Problem | None]:
    checked = 0
    seen: set[str] = set()
    state: tuple[str, int, str] | None = None  # chain, expected seq, previous hash
    for row in rows:
        chain = row["chain"]
        if state is None or state[0] != chain:
            if state is not None and (problem := _tail(heads[state[0]], state[1] - 1)) is not None:
                return checked, seen, problem
            head = heads.get(chain)
            if head is None:
                return checked, seen, _problem("inserted", row, f"chain {chain!r} was never started")
            seen.add(chain)
            state = (chain, head.anchor_seq + 1, head.anchor_hash)
        problem = _check(row, heads[chain], state[1], state[2])
        if problem is not None:
            return checked, seen, problem
        known = expected.get(chain)
        for hash_, source in known.get(row["seq"], ()) if known is not None else ():
            if hash_ != row["hash"]:
                why = f"its hash is not the one {source} holds: the chain was rewritten from here on"
                return checked, seen, _problem("edited", row, why)
        checked += 1
        state = (chain, row["seq"] + 1, row["hash"])
    if state is not None and (problem := _tail(heads[state[0]], state[1] - 1)) is not None:
        return checked, seen, problem
    return checked, seen, None


def _problem(kind: ProblemKind, row: Mapping[Any, Any], why: str) -> Problem:
    message = f"record {row['id']} (chain {row['chain']!r}, seq {row['seq']}) was {kind}: {why}"
    return Problem(kind, row["chain"], row["id"], row["seq"], message)


def _check(row: Mapping[Any, Any], head: Any, expected: int, prev_hash: str) -> Problem | None:
    seq = row["seq"]
    if seq > head.head_seq:
        return _problem("inserted", row, f"it lies beyond the chain's recorded head (seq {head.head_seq})")
    if seq < expected:
        return _problem("inserted", row, "its position in the chain was already taken or pruned")
    if record_hash(row) != row["hash"]:
        return _problem("edited", row, "its content does not match its hash")
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
        return Problem(
            "removed",
            row["chain"],
            row["id"],
            seq,
            f"record(s) {missing} of chain {row['chain']!r}, before record {row['id']}, were removed",
        )
    if row["prev_hash"] != prev_hash:
        return _problem("inserted", row, "it does not follow from its predecessor's hash")
    return None


def _tail(head: Any, last_seq: int) -> Problem | None:
    if last_seq < head.head_seq:
        missing = (
            f"seq {last_seq + 1}"
            if head.head_seq == last_seq + 1
            else f"seq {last_seq + 1} to {head.head_seq}"
        )
        return Problem(
            "removed",
            head.chain,
            None,
            last_seq + 1,
            f"the newest record(s) of chain {head.chain!r} ({missing}) were removed",
        )
    return None
