"""`JournalLog`: the audit writer for SQLite with `audit.durability: crash` (the default).

The event loop gives the records their place in the chain (the chain's head lives in memory) and
appends them to this process's journal (`journal.py`) with one `os.write`; their waiters are
answered at once. An ingest thread commits the journaled rows to SQL every `INGEST_EVERY_S` (at
once for a `flush`, `close` or a large backlog), in short GIL holds, and deletes the segments it has
covered. While ingest fails, or the backlog passes `BACKLOG_MAX`, new records are refused (fail
closed). At start-up, the journals of processes that are gone are replayed into SQL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord, AuditSettings
from agentgw.storage.audit.chain import ADVANCE_SQL, CHAIN_SQL, GENESIS, INSERT_COLUMNS
from agentgw.storage.audit.journal import BUSY_TIMEOUT_MS, Journal, journal_directory, replay_journals
from agentgw.storage.audit.sink import CANNOT_RECORD, Pending, SqlAuditLog, settle, unavailable

__all__ = ["BACKLOG_MAX", "INGEST_EVERY_S", "JournalLog"]

log = logging.getLogger(__name__)

# How often the ingest thread commits what the loop appended, in chunks of how many rows per GIL
# hold; how long it waits before retrying a failed ingest; how far behind SQL may fall before
# records are refused.
INGEST_EVERY_S = 0.05
INGEST_CHUNK = 32
RETRY_S = 1.0
BACKLOG_MAX = 100_000
# After this long idle, the ingest thread checkpoints the WAL.
CHECKPOINT_EVERY_S = 1.0

_VALUES = "(" + ", ".join("?" * len(INSERT_COLUMNS)) + ")"
# One statement inserts a whole chunk: sqlite3 lets go of the GIL around every statement it steps,
# and the loop takes it back each time, so a statement per row costs the loop more than the rows.
# INGEST_CHUNK x 31 parameters stays far below SQLite's limit (32,766).
_INSERT_CHUNK_SQL = {
    n: f"INSERT INTO audit_log ({', '.join(INSERT_COLUMNS)}) VALUES {', '.join([_VALUES] * n)}"  # noqa: S608 - the table's own column names and placeholders, no input
    for n in range(1, INGEST_CHUNK + 1)
}


class JournalLog(SqlAuditLog):
    """A `SqlAuditLog` whose records are durable once journaled, and committed to SQL by a thread."""

    def __init__(self, engine: Engine, settings: AuditSettings | None = None, **options: Any) -> None:
        super().__init__(engine, settings, **options)
        directory = journal_directory(engine)
        assert directory is not None  # `SqlAuditLog` chooses this writer only for a SQLite file
        self._journal_path = directory
        self._sqlite_path = str(engine.url.database)
        self._journal: Journal | None = None
        self._append_lock = threading.Lock()  # the loop appends; so may `close`, from another thread
        self._rows: list[dict[str, Any]] = []  # journaled, not yet taken by the ingest thread
        self._barriers: list[tuple[int, Pending]] = []  # flushes waiting for rows up to a count
        self._journaled = 0  # rows appended to the journal so far
        self._ingested = 0  # of which committed to SQL
        self._failing = False  # the last ingest failed: new records are refused
        self._stopping = False
        self._ingest_wake = threading.Event()
        self._ingest_conn: sqlite3.Connection | None = None
        self._taken = (0, GENESIS)  # the newest row the ingest thread took from the journal
        self._open_journal(directory)

    def _open_journal(self, directory: Path) -> None:
        try:
            replay_journals(self._sqlite_path, directory, self._checkpointer)
        except Exception:  # start anyway: what is not replayed stays in the journal for the next start
            log.exception("audit log: replaying the journals in %s failed", directory)
        try:
            self._journal = Journal(directory, self.chain)
        except OSError:
            # Fail closed: without a journal every record, so every call, is refused.
            log.exception("audit log: cannot open its journal in %s; calls will be refused", directory)

    # --- the sink ---
    def _take(self, batch: list[Pending]) -> bool:
        return False  # appended on the loop, under `_append_lock`, once the log's lock is released

    def _store(self, batch: list[Pending]) -> None:
        self._append(batch)

    def close(self, timeout: float = 10.0) -> None:
        """Journal what is queued, ingest it, then stop the thread and remove the ingested journal."""
        with self._lock:
            self._closed = True
            batch, self._outbox = self._outbox, []
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
        self._final_checkpoint(self._ingested)
        if self._ingest_conn is not None:
            self._ingest_conn.close()
        self._ingest_conn = None

    def _append(self, batch: list[Pending]) -> None:
        """Append the records of `batch` to the journal with one write, and answer their waiters now.

        The rows go to the ingest thread without waking it, unless a flush waits or the backlog is
        large. A failed write, a failing ingest or too long a backlog refuses every record of the batch.
        """
        pendings: list[Pending] = []
        records: list[AuditRecord] = []
        barriers: list[Pending] = []
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
                        error = unavailable(CANNOT_RECORD, exc)
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
        settle(pendings, error)
        if barriers and not waiting:
            settle(barriers, None)  # nothing is waiting to be ingested

    def problem(self) -> str | None:
        """Why the log refuses records now (the journal, the database, the backlog), or None."""
        refusal = self._refusal()
        return refusal.message if refusal is not None else None

    def backlog(self) -> int | None:
        """Records in the journal not yet committed to SQL (the ingest's lag)."""
        with self._lock:
            return self._journaled - self._ingested

    def _refusal(self) -> Unavailable | None:
        if self._journal is None:
            return unavailable(f"{CANNOT_RECORD} (the journal could not be opened)")
        if self._failing:
            return unavailable(f"{CANNOT_RECORD} (the database does not take records)")
        if self._journaled - self._ingested >= BACKLOG_MAX:
            return unavailable(f"{CANNOT_RECORD} (the database is {BACKLOG_MAX} records behind)")
        return None

    def _run(self) -> None:
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
                conn.execute(CHAIN_SQL, self._chain_row())
            # Short GIL holds: the rows come ready; bind them in chunks and let the loop run between.
            for start in range(0, len(rows), INGEST_CHUNK):
                part = rows[start : start + INGEST_CHUNK]
                conn.execute(_INSERT_CHUNK_SQL[len(part)], [row[c] for row in part for c in INSERT_COLUMNS])
                time.sleep(0)
            conn.execute(ADVANCE_SQL, (rows[-1]["seq"], rows[-1]["hash"], self.chain))
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
            settle(done, None)

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
