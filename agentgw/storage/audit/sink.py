"""`SqlAuditLog`, the gateway's `AuditSink`: records queued on the event loop, chained, and handed to
one of two writers, chosen at construction by what a stored record must survive.

`write` queues the record and returns once it is durable; `submit` queues it and returns (the
outcome records, decision 0207). Records queued in one turn of the event loop are handed on together
at its end; outcomes, which nobody waits for, linger up to `LINGER_S` to share the next write. The
writers (decision 0210):
- `ingest.JournalLog`, SQLite with `audit.durability: crash` (the default): the loop gives the
  records their place in the chain and appends them to this process's journal (`journal.py`); their
  waiters are answered at once, and a thread ingests the journal into SQL.
- `commit.CommitLog`, otherwise (PostgreSQL, or `durability: power`, a disk flush per commit): a
  writer thread commits each batch in one transaction while its waiters wait.
A record that cannot be stored fails every waiter of its batch with `Unavailable`, its submitted
records are logged, and the chain does not advance. `flush` waits until everything queued before it
is committed to SQL, so that a reader in the same process sees the submitted records; `close`
commits everything queued.

Both writers sign the chain's head now and then (`checkpoints.py`, decision 0215) from the thread
that stores the records, and prune by `audit.retention_days` (`retention.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord, AuditSettings, not_written, timestamp
from agentgw.storage.audit.chain import (
    GENESIS,
    audit_checkpoint,
    chain_row,
    checkpoint_row,
    create_audit_tables,
    stored_row,
)
from agentgw.storage.audit.checkpoints import Checkpoint, Checkpointer, CheckpointTrust
from agentgw.storage.audit.journal import journal_directory
from agentgw.storage.audit.retention import prune
from agentgw.storage.audit.verify import VerifyReport, verify
from agentgw.storage.db import STATEMENT_TIMEOUT_S

__all__ = ["LINGER_S", "SqlAuditLog"]

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
# How long records nobody waits for (outcomes) may wait to share a later write.
LINGER_S = 0.05


@dataclass(slots=True)
class Pending:
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


def settle(batch: Sequence[Pending], error: Unavailable | None) -> None:
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


def unavailable(why: str, cause: BaseException | None = None) -> Unavailable:
    error = Unavailable(f"audit log unavailable: {why}")
    error.__cause__ = cause
    return error


CANNOT_RECORD = "the call cannot be recorded, so it was not forwarded"


class SqlAuditLog:
    """The `AuditSink` of the gateway: one hash chain per process, stored in batches by one thread.

    Constructing it constructs the writer the database and `audit.durability` call for: a
    `JournalLog` or a `CommitLog`, each a `SqlAuditLog`.
    """

    def __new__(cls, engine: Engine, settings: AuditSettings | None = None, **_: Any) -> SqlAuditLog:
        if cls is SqlAuditLog:
            # The writers subclass this class, so they are imported here, once the base exists.
            from agentgw.storage.audit.commit import CommitLog
            from agentgw.storage.audit.ingest import JournalLog

            durability = (settings or AuditSettings()).durability
            journaled = journal_directory(engine) is not None and durability == "crash"
            cls = JournalLog if journaled else CommitLog
        return super().__new__(cls)

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
        self._retention_days = settings.retention_days
        self._clock = clock
        # Queued in this turn of the event loop, handed on at its end (`_hand_off`).
        self._outbox: list[Pending] = []
        self._hand_off_on: asyncio.AbstractEventLoop | None = None  # the loop that will hand it off
        self._linger_on: asyncio.AbstractEventLoop | None = None  # whose timer hands lingerers off
        self._thread: threading.Thread | None = None
        self._used = False
        # Guards `_closed`, the hand-over to the writer and its counters: nothing is queued after
        # close, where the writer would never see it and its waiter would wait for ever.
        self._lock = threading.Lock()
        self._head = (0, GENESIS)
        self._chain_written = False
        self._committing_since: float | None = None  # when the writer thread began its current commit
        self._pruned_at = 0.0
        self._closed = False
        # Transactions committed so far (group commit makes this far fewer than the records).
        self.commits = 0
        # Checkpoints, signed by the thread that stores the records, and at close.
        self._checkpointer = checkpointer
        self.trust = trust
        self._signed = (0, time.monotonic())  # this chain's newest checkpoint: its seq, and when
        self._unstored: list[Checkpoint] = []  # signed, not yet in the database
        try:
            create_audit_tables(engine)
        except SQLAlchemyError:
            # Start anyway: every call then fails with 503 until the store is back (fail closed).
            log.exception("audit log: cannot create its tables; calls will be refused until it can")

    # --- what the writers do ---
    def _take(self, batch: list[Pending]) -> bool:
        """Called with `_lock` held: take `batch` now (True), or leave it to `_store`, which the
        caller calls once the lock is released (False)."""
        raise NotImplementedError

    def _store(self, batch: list[Pending]) -> None:
        """Store `batch` (the writer's records and flush barriers) and settle its waiters."""
        raise NotImplementedError

    def _run(self) -> None:
        """The writer's thread."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, commit it, then stop the thread."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why the log refuses records now, or None. A writer that commits while its waiters wait has
        nothing to report ahead of a write: a write that fails says why itself."""
        return None

    def backlog(self) -> int | None:
        """Records stored but not yet committed to SQL, or None when a record is committed before its
        writer hears back."""
        return None

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
            raise unavailable(f"the database has not answered for {self._timeout_s:g}s; {CANNOT_RECORD}")
        future = asyncio.get_running_loop().create_future()
        self._put(Pending(record, future.get_loop(), future))
        try:
            async with asyncio.timeout(self._timeout_s):
                await future
        except TimeoutError as exc:
            raise unavailable(f"no answer within {self._timeout_s:g}s; {CANNOT_RECORD}", exc) from exc

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` and return at once; if it cannot be stored, it is logged.

        Raises:
            Unavailable: the log is closed.
        """
        self._put(Pending(record))

    async def flush(self) -> None:
        """Return once every record queued before this call is committed (or failed, and was logged).

        Readers in this process await it first, so they see the records `submit` queued.
        """
        if not self._used:
            return  # nothing was ever queued
        future = asyncio.get_running_loop().create_future()
        try:
            self._put(Pending(None, future.get_loop(), future))
        except Unavailable:
            return  # closing: close commits everything queued before it
        await future

    def verify(self) -> VerifyReport:
        """`verify` of this log's database, held to its checkpoints (`trust`)."""
        return verify(self.engine, self.trust)

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, pending: Pending) -> None:
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
                if self._take(batch):
                    return
        if loop is None:
            self._store(batch)
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
            if self._take(batch):
                return
        self._store(batch)

    def _linger_over(self) -> None:
        with self._lock:
            self._linger_on = None
            batch, self._outbox = self._outbox, []
            if not batch:
                return
            if self._take(batch):
                return
        self._store(batch)

    def _start_thread(self) -> None:
        # Called with `_lock` held.
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _chained(self, records: Sequence[AuditRecord]) -> tuple[list[dict[str, Any]], bytes, int, str]:
        """The stored rows of `records`, chained after the head (which this does not move), their
        journal lines, and the new head."""
        seq, prev = self._head
        rows = []
        lines = []
        for record in records:
            seq += 1
            row = stored_row(record, self.chain, seq, prev)
            canonical = orjson.dumps(row)  # sorted keys already: what `record_hash` hashes
            row["hash"] = prev = hashlib.sha256(canonical).hexdigest()
            rows.append(row)
            # The journal line is the canonical JSON with the hash as its last member.
            lines.append(b'%s,"hash":"%s"}\n' % (canonical[:-1], prev.encode()))
        return rows, b"".join(lines), seq, prev

    # --- checkpoints: signed by the thread that stores the records, and at close ---
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
                conn.execute(insert(audit_checkpoint), [checkpoint_row(c) for c in ready])
        except SQLAlchemyError:
            log.warning(
                "audit log: checkpoints not stored in the database (the sink has them)", exc_info=True
            )
            return
        self._unstored = [c for c in self._unstored if c.seq > committed_seq]

    def _final_checkpoint(self, committed_seq: int) -> None:
        # The final checkpoint: `verify` takes any record after it for an insertion.
        if self._checkpointer is not None and not self._thread_alive():
            self._maybe_checkpoint(*self._head, last=True)
            self._store_checkpoints(committed_seq)
            self._checkpointer.close()

    def _chain_row(self) -> dict[str, Any]:
        return chain_row(self.chain, self.node, timestamp(self._clock()))

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
