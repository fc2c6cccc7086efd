"""Budget counters in the gateway's SQL database (SQLite or PostgreSQL), shared by many processes.

A reservation is one transaction of conditional `UPDATE ... SET used = used + n WHERE used + n <= limit`
statements, taken in key order so that two transactions never wait on each other in a cycle.
PostgreSQL re-checks the condition on the row a concurrent winner left; SQLite has one writer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel

from agentgw.errors import Unavailable
from agentgw.records.budget import Charge, Shortfall
from agentgw.storage.budget.table import PRUNE_EVERY_S
from agentgw.storage.budget.table import counter_table as _T
from agentgw.storage.db import STATEMENT_TIMEOUT_S

__all__ = ["SqlBudgetStore"]

# Keys come from callers (run ids, subjects): the set of ensured counters is emptied past this size.
MAX_ENSURED = 100_000
_R = TypeVar("_R")


class SqlBudgetStore:
    """Counters in the gateway's SQL database; every reservation is a transaction.

    Each operation runs in a worker thread and is refused once it has taken `timeout_s`: the thread
    is then abandoned, not awaited (a hung server holds it until it answers or the connection breaks),
    and what it still commits counts against the budget, never for it.
    """

    def __init__(self, engine: Engine, *, timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"budget counters need SQLite or PostgreSQL, not {dialect}")
        self._engine = engine
        self._timeout_s = timeout_s
        self._insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        # SQLite has one writer per database anyway; queueing in-process avoids busy-waiting on it.
        self._lock: threading.Lock | None = threading.Lock() if dialect == "sqlite" else None
        self._pruned_at = 0.0
        # Counters this process has ensured, with their expiry as stored: a live one needs no upsert
        # per call. Only a shortcut: a counter that vanished since is re-created on the spot.
        self._ensured: dict[str, float] = {}
        SQLModel.metadata.create_all(engine, tables=[_T])

    def _ensure(self, conn: Connection, key: str, initial: int, expires_at: float, now: float) -> None:
        # Create the counter, or start an expired one afresh; a live one is left alone.
        stmt = self._insert(_T).values(key=key, used=initial, expires_at=expires_at)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[_T.c.key],
                set_={"used": stmt.excluded.used, "expires_at": stmt.excluded.expires_at},
                where=_T.c.expires_at <= now,
            )
        )

    def _run(self, work: Callable[[], _R]) -> _R:
        try:
            if self._lock is None:
                return work()
            with self._lock:
                return work()
        except SQLAlchemyError as exc:
            raise Unavailable("budget store unavailable: the call was not forwarded") from exc

    async def _in_thread(self, work: Callable[[], _R]) -> _R:
        try:
            with anyio.fail_after(self._timeout_s):
                return await anyio.to_thread.run_sync(lambda: self._run(work), abandon_on_cancel=True)
        except TimeoutError as exc:
            raise Unavailable(
                f"budget store unavailable: no answer within {self._timeout_s:g}s; the call was not forwarded"
            ) from exc

    def _reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        ensured: dict[str, float] = {}
        with self._engine.connect() as conn:
            for index in sorted(range(len(charges)), key=lambda i: charges[i].key):
                charge = charges[index]
                if self._ensured.get(charge.key, 0.0) <= now:
                    self._ensure(conn, charge.key, 0, charge.expires_at, now)
                    stored = conn.execute(select(_T.c.expires_at).where(_T.c.key == charge.key)).scalar_one()
                    ensured[charge.key] = float(stored)
                result = conn.execute(
                    update(_T)
                    .where(
                        _T.c.key == charge.key,
                        _T.c.used + charge.amount <= charge.limit,
                        _T.c.used < charge.limit,
                    )
                    .values(used=_T.c.used + charge.amount)
                )
                if result.rowcount == 0:
                    used = conn.execute(select(_T.c.used).where(_T.c.key == charge.key)).scalar_one_or_none()
                    conn.rollback()
                    if used is None:  # pruned by another process since this one ensured it: again, afresh
                        self._ensured.clear()
                        return self._reserve(charges, now)
                    return Shortfall(index, int(used))
            if now - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = now
                conn.execute(delete(_T).where(_T.c.expires_at < now))
                self._ensured = {k: e for k, e in self._ensured.items() if e > now}
            conn.commit()
        # Only once committed: before that, another connection may not see the row yet.
        if len(self._ensured) > MAX_ENSURED:
            self._ensured.clear()
        self._ensured.update(ensured)
        return None

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        """Take every charge, or none.

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        return await self._in_thread(lambda: self._reserve(charges, now))

    def _adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        with self._engine.connect() as conn:
            for key, delta in sorted(deltas):
                conn.execute(update(_T).where(_T.c.key == key).values(used=_T.c.used + delta))
            conn.commit()

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add `delta` to each counter that still exists.

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        await self._in_thread(lambda: self._adjust(deltas))

    def _started(self, key: str, now: float, expires_at: float) -> float:
        with self._engine.connect() as conn:
            self._ensure(conn, key, int(now * 1000), expires_at, now)
            value = conn.execute(select(_T.c.used).where(_T.c.key == key)).scalar_one()
            conn.commit()
        return int(value) / 1000

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """The first `now` recorded under `key` (millisecond precision).

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        return await self._in_thread(lambda: self._started(key, now, expires_at))

    def _used(self, keys: Sequence[str], now: float) -> dict[str, int]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_T.c.key, _T.c.used).where(_T.c.key.in_(list(keys)), _T.c.expires_at > now)
            ).all()
        return {str(k): int(v) for k, v in rows}

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]:
        """Current values of the live counters among `keys` (absent: nothing used yet).

        Raises:
            Unavailable: the database cannot be reached.
        """
        at = time.time() if now is None else now
        return await self._in_thread(lambda: self._used(keys, at))

    async def aclose(self) -> None:
        return None
