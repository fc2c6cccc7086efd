"""`CommitLog`: the audit writer for PostgreSQL, and for SQLite with `audit.durability: power`.

A writer thread commits each batch of records in one transaction (at most `batch_max` records)
while their waiters wait, and wakes each event loop once per batch: a record is durable when SQL
has committed it. The loop only queues; the chain's head moves in the thread, after each commit.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord, AuditSettings
from agentgw.storage.audit.chain import audit_chain, audit_log, create_audit_tables
from agentgw.storage.audit.sink import CANNOT_RECORD, Pending, SqlAuditLog, settle, unavailable

__all__ = ["CommitLog"]

log = logging.getLogger(__name__)

# Built once: constructing a statement costs more than executing a cached one.
_INSERT = insert(audit_log)
_ADVANCE = (
    update(audit_chain)
    .where(audit_chain.c.chain == bindparam("of_chain"))
    .values(head_seq=bindparam("to_seq"), head_hash=bindparam("to_hash"))
)


class CommitLog(SqlAuditLog):
    """A `SqlAuditLog` whose records are committed to SQL before their writers hear back."""

    def __init__(self, engine: Engine, settings: AuditSettings | None = None, **options: Any) -> None:
        super().__init__(engine, settings, **options)
        self._synchronous = "FULL" if (settings or AuditSettings()).durability == "power" else "NORMAL"
        self._queue: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._head_unsure = False  # a commit failed: it may have happened all the same

    def _take(self, batch: list[Pending]) -> bool:
        # Queued with the lock held, so that no batch is queued behind the stop `close` queues.
        self._queue.put(batch)
        return True

    def _store(self, batch: list[Pending]) -> None:
        self._queue.put(batch)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            batch, self._outbox = self._outbox, []
            if self._thread is not None:
                if batch:
                    self._queue.put(batch)
                self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._final_checkpoint(self._head[0])
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _run(self) -> None:
        """The writer thread: commit what is queued, a batch per transaction; sign and prune between."""
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
                settle(part, error)
                self._checkpoint_committed()
                if error is None and self._retention_days is not None:
                    self._maybe_prune()
            if stopping:
                break

    def _checkpoint_committed(self) -> None:
        self._maybe_checkpoint(*self._head)
        self._store_checkpoints(self._head[0])

    def _gather(self, batch: list[Pending]) -> tuple[list[Pending], bool]:
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
            return unavailable(CANNOT_RECORD, exc)
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
