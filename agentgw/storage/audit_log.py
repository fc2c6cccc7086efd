"""The audit log in SQL: append-only, hash-chained, written by group commit; queries and `verify`.

Chains: every gateway process appends to its own chain, named `<node>:<random>` at start-up, so
several processes (on one machine or many) can write one table without coordinating. Each record
holds its chain, its position `seq` (1, 2, ...), the hash of its predecessor in the chain and its
own hash: SHA-256 over the canonical JSON of all its columns but `id` and `hash`. The
`audit_chain` table holds each chain's head (last seq and hash), updated in the same transaction
as the records, so that removing the newest records is detected too; retention moves a chain's
anchor (the last removed record) forward so that a pruned chain still verifies.

Group commit: `SqlAuditLog.write` queues the record and waits; `submit` queues it and returns (the
outcome records: decision 0207). Records queued in one turn of the event loop are committed together
at its end, in transactions of at most `batch_max` records; outcomes, which nobody waits for, linger
up to `LINGER_S` to share the next transaction. Where the commit runs (decision 0209):
- SQLite with `audit.durability: crash` (the default: WAL, `synchronous=NORMAL`, so a commit survives
  the process crashing, SIGKILL included, without a disk flush): on the event loop itself, on a
  connection of its own that never waits for a lock. A write lock held elsewhere (the budget ledger's
  flush, a prune) sends the batch, and every batch after it until the thread has caught up, to the
  writer thread, which waits for the lock; the writer thread also checkpoints the WAL (the step that
  flushes to disk), so the loop never does.
- Otherwise (PostgreSQL, or `durability: power`, a flush per commit): in the writer thread, which
  wakes each event loop once per batch (`call_soon_threadsafe`).
A failed transaction fails every waiter of that batch with `Unavailable`, logs every submitted record
of it, and the chain does not advance. `flush` waits until everything queued before it is committed,
so that a reader in the same process sees the submitted records; `close` commits everything queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter
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

__all__ = [
    "GENESIS",
    "AuditQuery",
    "Problem",
    "SqlAuditLog",
    "VerifyReport",
    "create_audit_tables",
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
# How often the writer thread checkpoints the WAL when commits run on the event loop.
CHECKPOINT_EVERY_S = 1.0
# SQLite's "database is locked" codes (SQLITE_BUSY, SQLITE_LOCKED).
_SQLITE_BUSY = frozenset({5, 6})
# How long records nobody waits for (outcomes, decision 0207) may wait to share a later commit.
LINGER_S = 0.05

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


_FIELDS = tuple(f.name for f in fields(AuditRecord))
_values = attrgetter(*_FIELDS)


def _row(record: AuditRecord) -> dict[str, Any]:
    # Not `dataclasses.asdict`: it deep-copies every value, which made it most of a record's cost.
    row = dict(zip(_FIELDS, _values(record), strict=True))
    for name in _LIST_COLUMNS:
        row[name] = orjson.dumps(row[name]).decode()  # a tuple is a JSON array, as a list is
    return row


# Built once: constructing a statement costs more than executing a cached one.
_INSERT = insert(audit_log)
# The same statements for the driver's own SQLite connection on the event loop (decision 0209),
# compiled by SQLAlchemy for SQLite once: `?` parameters in `positiontup` order.
_INSERT_COLUMNS = tuple(str(c.name) for c in audit_log.columns if c.name != "id")
_CHAIN_COLUMNS = tuple(str(c.name) for c in audit_chain.columns)


def _positional(statement: Any, columns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    compiled = statement.compile(dialect=sqlite_dialect.dialect(), column_keys=list(columns))
    return str(compiled), tuple(compiled.positiontup)


_INSERT_SQL, _INSERT_ORDER = _positional(insert(audit_log), _INSERT_COLUMNS)
_CHAIN_SQL, _CHAIN_ORDER = _positional(insert(audit_chain), _CHAIN_COLUMNS)
_ADVANCE_SQL = "UPDATE audit_chain SET head_seq = ?, head_hash = ? WHERE chain = ?"
_ADVANCE = (
    update(audit_chain)
    .where(audit_chain.c.chain == bindparam("of_chain"))
    .values(head_seq=bindparam("to_seq"), head_hash=bindparam("to_hash"))
)


@dataclass(slots=True)
class _Pending:
    """A record to commit, or (no record) a flush barrier; with a `future` on `loop` when awaited."""

    record: AuditRecord | None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None


_BUSY = Unavailable("audit log: the database is locked; the writer thread takes the batch")


def _busy(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _SQLITE_BUSY


def _wake(settled: Sequence[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for future, error in settled:
        if future.done():  # the waiter was cancelled; the record is written (or not) all the same
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class SqlAuditLog:
    """The `AuditSink` of the gateway: one hash chain per process, group-committed by one thread."""

    def __init__(
        self, engine: Engine, settings: AuditSettings | None = None, *, clock: Any = time.time
    ) -> None:
        settings = settings or AuditSettings()
        self.engine = engine
        self.node = settings.node_id or socket.gethostname()
        self.chain = f"{self.node}:{uuid.uuid4().hex[:12]}"
        self._batch_max = settings.batch_max
        self._synchronous = "FULL" if settings.durability == "power" else "NORMAL"
        self._retention_days = settings.retention_days
        self._clock = clock
        self._queue: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        # Queued in this turn of the event loop, handed to the writer at its end (`_hand_off`).
        self._outbox: list[_Pending] = []
        self._hand_off_on: asyncio.AbstractEventLoop | None = None  # the loop that will hand it off
        self._linger_on: asyncio.AbstractEventLoop | None = None  # whose timer hands lingerers off
        self._thread: threading.Thread | None = None
        # SQLite without a flush per commit: commits run on the event loop itself, on a connection
        # of their own that never waits for a lock (a held one sends the batch to the writer thread).
        url = engine.url
        file_db = url.database not in (None, "", ":memory:") and not url.query
        self._sqlite_path = url.database if engine.dialect.name == "sqlite" and file_db else None
        self._inline = self._sqlite_path is not None and settings.durability == "crash"
        self._loop_conn: sqlite3.Connection | None = None
        self._in_thread = 0  # batches handed to the writer thread and not yet committed
        self._used = False
        # Guards `_closed` and the queue's end: nothing is queued after close's stop marker, where
        # the writer would never see it and its waiter would wait for ever.
        self._lock = threading.Lock()
        self._head = (0, GENESIS)
        self._chain_written = False
        self._conn: Connection | None = None
        self._pruned_at = 0.0
        self._closed = False
        # Transactions committed so far (group commit makes this far fewer than the records).
        self.commits = 0
        try:
            create_audit_tables(engine)
        except SQLAlchemyError:
            # Start anyway: every call then fails with 503 until the store is back (fail closed).
            log.exception("audit log: cannot create its tables; calls will be refused until it can")

    # --- the sink ---
    async def write(self, record: AuditRecord) -> None:
        """Queue `record` and return once its batch is committed.

        Raises:
            Unavailable: the batch could not be committed, or the log is closed.
        """
        future = asyncio.get_running_loop().create_future()
        self._put(_Pending(record, future.get_loop(), future))
        await future

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` and return at once; if its batch cannot be committed, it is logged.

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
        """Commit what is queued, then stop the writer thread."""
        with self._lock:
            self._closed = True
            if self._outbox:
                self._to_thread(self._outbox)
                self._outbox = []
            if self._thread is not None:
                self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None

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
            if loop is None:
                self._to_thread(self._outbox)
                self._outbox = []
                return
            schedule = self._hand_off_on is not loop
            self._hand_off_on = loop
        if schedule:
            # Waking the writer costs a system call and a turn for the GIL: once per turn of the loop.
            loop.call_soon(self._hand_off)

    def _hand_off(self) -> None:
        with self._lock:
            self._hand_off_on = None
            waited = any(p.future is not None for p in self._outbox)
            if not waited and len(self._outbox) < self._batch_max:
                # Records nobody waits for (outcomes) linger up to `LINGER_S`, so that they share the
                # next transaction (usually the next call's decision) instead of paying for one of
                # their own: one commit per call when calls come one at a time.
                loop = asyncio.get_running_loop()
                if self._outbox and self._linger_on is not loop:
                    self._linger_on = loop
                    loop.call_later(LINGER_S, self._linger_over)
                return
            batch, self._outbox = self._outbox, []
            if not self._inline or self._in_thread:
                self._to_thread(batch)  # behind what the thread holds: records keep their order
                return
        self._commit_on_loop(batch)

    def _linger_over(self) -> None:
        with self._lock:
            self._linger_on = None
            batch, self._outbox = self._outbox, []
            if not batch:
                return
            if not self._inline or self._in_thread:
                self._to_thread(batch)
                return
        self._commit_on_loop(batch)

    def _to_thread(self, batch: list[_Pending]) -> None:
        # Called with `_lock` held.
        if self._thread is None:
            self._start_thread()
        self._in_thread += 1
        self._queue.put(batch)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _commit_on_loop(self, batch: list[_Pending]) -> None:
        """Commit `batch` here, on the event loop: no thread round trip before a call is forwarded.

        SQLite with `synchronous=NORMAL` commits without a disk flush (tens of microseconds). The loop's
        connection never waits: a write lock held elsewhere (the budget ledger's flush, a prune) sends
        the batch to the writer thread, which waits for it; WAL checkpoints, which flush, run there
        too (`_run`), never here.
        """
        for start in range(0, len(batch), self._batch_max):
            part = batch[start : start + self._batch_max]
            records = [p.record for p in part if p.record is not None]
            error = self._commit(records, on_loop=True) if records else None
            if error is _BUSY:
                with self._lock:
                    self._to_thread(batch[start:])
                return
            self._settle(part, error)

    # --- the writer thread ---
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=CHECKPOINT_EVERY_S if self._inline else None)
            except queue.Empty:
                self._checkpoint()
                continue
            if item is None:
                break
            batch, items, stopping = self._gather(list(item))
            for start in range(0, len(batch), self._batch_max):
                part = batch[start : start + self._batch_max]
                records = [p.record for p in part if p.record is not None]
                error = self._commit(records) if records else None
                self._settle(part, error)
                if error is None and self._retention_days is not None:
                    self._maybe_prune()
            with self._lock:
                self._in_thread -= items
        if self._inline:
            self._checkpoint()

    def _checkpoint(self) -> None:
        # The loop's connection never checkpoints (a checkpoint flushes to disk): this thread does, with
        # PASSIVE, which neither waits for nor blocks the writers.
        try:
            self._connection().exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except SQLAlchemyError:
            log.warning("audit log: WAL checkpoint failed; the next one tries again", exc_info=True)
            self._drop_connection()

    def _gather(self, batch: list[_Pending]) -> tuple[list[_Pending], int, bool]:
        """More of what is queued, for one transaction: the records, how many hand-offs they came in,
        and whether the log is closing."""
        items = 1
        while len(batch) < self._batch_max:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, items, True
            batch.extend(more)
            items += 1
        return batch, items, False

    def _settle(self, batch: Sequence[_Pending], error: Unavailable | None) -> None:
        # One wake-up per event loop for the whole batch: each costs the loop a self-pipe write
        # and a turn, and the GIL.
        waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Unavailable | None]]] = {}
        for pending in batch:
            if pending.future is not None and pending.loop is not None:
                # A flush barrier waits for the batch to be done, not for it to succeed.
                outcome = error if pending.record is not None else None
                waiting.setdefault(pending.loop, []).append((pending.future, outcome))
            elif error is not None and pending.record is not None:
                not_written(pending.record, exc_info=False)  # submitted: nobody waits to hear
        for loop, settled in waiting.items():
            try:
                if self._on(loop):
                    _wake(settled)
                else:
                    loop.call_soon_threadsafe(_wake, settled)
            except RuntimeError:  # that event loop is closed: nobody waits any more
                continue

    @staticmethod
    def _on(loop: asyncio.AbstractEventLoop) -> bool:
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self.engine.connect()
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"PRAGMA synchronous={self._synchronous}")
                conn.commit()
            self._conn = conn
        return self._conn

    def _loop_connection(self) -> sqlite3.Connection:
        # The driver's own connection, outside SQLAlchemy and its pool: on the event loop every
        # statement's overhead is a call's latency, and these settings must reach no one else.
        if self._loop_conn is None:
            assert self._sqlite_path is not None
            conn = sqlite3.connect(self._sqlite_path, isolation_level=None, check_same_thread=False)
            for pragma in ("synchronous=NORMAL", "busy_timeout=0", "wal_autocheckpoint=0"):
                conn.execute(f"PRAGMA {pragma}")
            self._loop_conn = conn
        return self._loop_conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                log.debug("audit log: closing a broken connection failed", exc_info=True)
            self._conn = None

    def _commit(self, records: Sequence[AuditRecord], *, on_loop: bool = False) -> Unavailable | None:
        seq, prev = self._head
        rows = []
        for record in records:
            seq += 1
            row = _row(record) | {"chain": self.chain, "seq": seq, "prev_hash": prev}
            row["hash"] = prev = record_hash(row)
            rows.append(row)
        try:
            if not self._chain_written:
                create_audit_tables(self.engine)
            if on_loop:
                self._write_on_loop(rows, seq, prev)
            else:
                self._write(rows, seq, prev)
        except Exception as exc:  # whatever it was, the writer thread must live on and answer
            if on_loop and _busy(exc):
                return _BUSY  # a write lock is held elsewhere: the writer thread waits for it
            log.error("audit log: %d records not written: %s", len(rows), exc)
            if on_loop:
                self._drop_loop_connection()
            else:
                self._drop_connection()
            error = Unavailable("audit log unavailable: the call cannot be recorded, so it was not forwarded")
            error.__cause__ = exc
            return error
        self._head = (seq, prev)
        self._chain_written = True
        self.commits += 1
        return None

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

    def _write_on_loop(self, rows: list[dict[str, Any]], seq: int, head: str) -> None:
        conn = self._loop_connection()
        # IMMEDIATE: the write lock now or SQLITE_BUSY now (busy_timeout=0), never a wait.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not self._chain_written:
                chain = self._chain_row()
                conn.execute(_CHAIN_SQL, [chain[c] for c in _CHAIN_ORDER])
            conn.executemany(_INSERT_SQL, [[row[c] for c in _INSERT_ORDER] for row in rows])
            conn.execute(_ADVANCE_SQL, (seq, head, self.chain))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _drop_loop_connection(self) -> None:
        if self._loop_conn is not None:
            try:
                self._loop_conn.close()
            except sqlite3.Error:
                log.debug("audit log: closing a broken connection failed", exc_info=True)
            self._loop_conn = None

    def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._pruned_at < PRUNE_EVERY_S or self._retention_days is None:
            return
        self._pruned_at = now
        try:
            removed = prune(self.engine, timestamp(now - self._retention_days * 86400))
        except SQLAlchemyError:
            log.exception("audit log: retention pruning failed")
            return
        if removed:
            log.info("audit log: retention removed %d records", removed)


def prune(engine: Engine, before: str) -> int:
    """Delete records older than `before` (a `timestamp`), moving each chain's anchor; returns how many.

    Records go in chain order up to the last one older than `before`, so that a chain never has a
    hole: what remains starts right after its anchor.
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
            conn.execute(
                update(audit_chain)
                .where(audit_chain.c.chain == chain, audit_chain.c.anchor_seq < last.seq)
                .values(anchor_seq=last.seq, anchor_hash=last.hash)
            )
    return removed


# --- reading --------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> str:
    """A time filter as a `timestamp`: ISO 8601 (`2026-05-01T10:00:00Z`) or an age (`15m`, `2h`, `7d`).

    Raises:
        ValueError: neither form.
    """
    match = _RELATIVE.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return timestamp((time.time() if now is None else now) - seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"invalid time {text!r}: use ISO 8601 (2026-05-01T10:00:00Z) or an age (15m, 2h, 7d)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return timestamp(moment.timestamp())


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

ProblemKind = Literal["edited", "removed", "inserted"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with the log."""

    kind: ProblemKind
    chain: str
    record_id: int | None  # the record named; None when records at a chain's end are gone
    seq: int | None
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    records: int
    chains: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(engine: Engine) -> VerifyReport:
    """Walk every chain and report the first record that was edited, removed or inserted."""
    with engine.connect() as conn:
        heads = {r.chain: r for r in conn.execute(select(audit_chain))}
        rows = conn.execution_options(yield_per=1000).execute(
            select(audit_log).order_by(audit_log.c.chain, audit_log.c.seq, audit_log.c.id)
        )
        try:
            checked, seen, problem = _walk((r._mapping for r in rows), heads)
        finally:
            rows.close()  # stopping at the first problem leaves a server-side cursor open otherwise
    if problem is None:
        for chain, head in heads.items():
            if chain not in seen and head.head_seq > head.anchor_seq:
                span = f"seq {head.anchor_seq + 1} to {head.head_seq}"
                message = f"every record of chain {chain!r} ({span}) was removed"
                problem = Problem("removed", chain, None, head.anchor_seq + 1, message)
                break
    return VerifyReport(checked, len(heads), problem)


def _walk(
    rows: Iterator[Mapping[Any, Any]], heads: Mapping[str, Any]
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
