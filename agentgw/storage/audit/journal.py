"""The journal: where a SQLite log's records are durable before SQL has them, and their replay.

Each process appends its chain's rows, as JSON lines, to numbered segment files in
`<database file>.audit-journal/`, with one `os.write` per batch: a record in the page cache survives
the process dying (SIGKILL included), as a WAL commit with `synchronous=NORMAL` does. A lock file,
held for the log's life, tells a live process's journal from a dead one's; at start-up the journals
of dead processes are replayed into SQL (`replay_journals`). The ingest thread that moves a live
journal into SQL is `ingest.JournalLog`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from agentgw.storage.audit.chain import (
    ADVANCE_SQL,
    CHAIN_SQL,
    CHECKPOINT_SQL,
    GENESIS,
    HEAD_SQL,
    INSERT_SQL,
    chain_row,
    checkpoint_row,
    record_hash,
)
from agentgw.storage.audit.checkpoints import Checkpointer

__all__ = ["BUSY_TIMEOUT_MS", "SEGMENT_BYTES", "Journal", "journal_directory", "replay_journals", "segments"]

log = logging.getLogger(__name__)

# When the loop starts a new segment file.
SEGMENT_BYTES = 4 * 1024 * 1024
# How long a connection of the journal's writers waits for SQLite's lock.
BUSY_TIMEOUT_MS = 5000


def journal_directory(engine: Engine) -> Path | None:
    """Where the journal of a SQLite file database lives (`<file>.audit-journal`); None otherwise."""
    url = engine.url
    file_db = url.database not in (None, "", ":memory:") and not url.query
    if engine.dialect.name != "sqlite" or not file_db:
        return None
    return Path(f"{url.database}.audit-journal")


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _chain_id(chain: str) -> str:
    """A chain's name as a file name: no dots, so `<id>.<n>.jsonl` and `<id>.lock` parse back."""
    return _UNSAFE.sub("_", chain)


class Journal:
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


def segments(directory: Path, chain_id: str) -> list[Path]:
    numbered = []
    for path in directory.glob(f"{chain_id}.*.jsonl"):
        number = path.name[len(chain_id) + 1 : -len(".jsonl")]
        if number.isdigit():
            numbered.append((int(number), path))
    return [path for _, path in sorted(numbered)]


def _replay_chain(
    database: str, directory: Path, chain_id: str, lock_path: Path, checkpointer: Checkpointer | None
) -> int:
    found = segments(directory, chain_id)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        rows, problem, end = _read_journal(conn, found)
        if rows:
            first = rows[0]
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute(HEAD_SQL, (first["chain"],)).fetchone() is None:
                    node = first["chain"].rpartition(":")[0] or first["chain"]
                    conn.execute(CHAIN_SQL, chain_row(first["chain"], node, first["time"]))
                conn.executemany(INSERT_SQL, rows)
                conn.execute(ADVANCE_SQL, (rows[-1]["seq"], rows[-1]["hash"], first["chain"]))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if checkpointer is not None and problem is None and end is not None and end[1] > 0:
            final = checkpointer.sign("head", end[0], end[1], end[2], last=True)
            try:
                conn.execute(CHECKPOINT_SQL, checkpoint_row(final))
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
        for path in [*found, lock_path]:
            os.replace(path, path.with_name(path.name + ".unreadable"))
    else:
        for path in found:
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
                    found = conn.execute(HEAD_SQL, (chain,)).fetchone()
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
