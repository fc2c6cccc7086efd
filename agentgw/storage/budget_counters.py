"""Budget counters behind the `BudgetStore` protocol: local (in memory), SQL (SQLite or PostgreSQL), Redis.

Each reserves all of a call's charges or none:
- Local (the default): the counters live in this process's memory and are the truth; a
  reservation is a few dict operations with no await between check and add, so it is atomic on the
  event loop. A thread writes changed counters to the `budget_counter` table every `flush_s` and
  at close, and they are loaded from it at start; what a crash lost since the last save is recounted
  from the audit log's decision records (`recount`). One process owns the ledger of a database (a
  lease row); a ledger whose saving fails refuses calls (waiting for a busy write lock is not failing).
- SQL: atomic across processes; one transaction of conditional
  `UPDATE ... SET used = used + n WHERE used + n <= limit` statements, taken in key order so that
  two transactions never wait on each other in a cycle.
  PostgreSQL re-checks the condition on the row a concurrent winner left; SQLite has one writer.
- Redis: one Lua script checks every counter, then adds to every counter.
A counter expires with its window (or, for runs, `run_ttl_s` after the run's first call); an
expired counter starts again from zero.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import BigInteger, Connection, Engine, Float, Integer, String, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from agentgw.call import Call, Principal
from agentgw.errors import ConfigError, Unavailable
from agentgw.filters.budget import (
    COST_SCALE,
    SPENDING_ACTIONS,
    BudgetRule,
    BudgetSettings,
    BudgetStore,
    Charge,
    Metric,
    Shortfall,
    admits,
    plan,
    run_key,
    targets,
)
from agentgw.storage.db import STATEMENT_TIMEOUT_S, DatabaseSettings
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = [
    "BudgetCounter",
    "BudgetLedgerLease",
    "LocalBudgetStore",
    "RedisBudgetStore",
    "SqlBudgetStore",
    "budget_reader",
    "budget_store",
]

log = logging.getLogger(__name__)

# Expired counters are deleted at most this often, by whichever reservation comes along.
PRUNE_EVERY_S = 300.0


class BudgetCounter(SQLModel, table=True):
    __tablename__ = "budget_counter"

    key: str = Field(primary_key=True, sa_type=String(512))
    used: int = Field(default=0, sa_type=BigInteger)
    expires_at: float = Field(index=True, sa_type=Float)


_T = BudgetCounter.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped


class BudgetLedgerLease(SQLModel, table=True):
    """Which process owns the local ledger of this database; renewed by every flush."""

    __tablename__ = "budget_ledger_lease"

    name: str = Field(primary_key=True, sa_type=String(64))
    owner: str = Field(sa_type=String(64))  # a random id per store
    host: str = Field(sa_type=String(256))  # host name and PID namespace, to recognise a dead owner
    pid: int = Field(sa_type=Integer)
    heartbeat: float = Field(sa_type=Float)  # the owner's wall clock at its last flush


_L = BudgetLedgerLease.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped
LEDGER = "budget_counter"


MAX_ENSURED = 100_000
_R = TypeVar("_R")


class SqlBudgetStore:
    """Counters in the gateway's SQL database (the embedded default).

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


# A local ledger whose saving has failed for this many flush intervals refuses calls; its lease
# counts as abandoned after twice as long, so an owner that cannot write is already refusing calls
# when another process takes over (with room for clock skew between hosts). Waiting for the
# database's write lock is not failing: it is logged once saving lags this far behind.
FAIL_AFTER_FLUSHES = 5
STALE_AFTER_FLUSHES = 10
# One save that has run this much longer than the fail-closed bound hangs (SQLite's own lock waits
# end after its busy timeout, 5 s, and count as lag).
HUNG_AFTER_S = 10.0
KEY_MAX = 512  # the `key` column's size
_BIGINT = (-(2**63), 2**63 - 1)  # the `used` column's range


class _Counter:
    __slots__ = ("expires_at", "used")

    def __init__(self, used: int, expires_at: float) -> None:
        self.used = used
        self.expires_at = expires_at


class _LeaseLost(Exception):
    pass


def _lock_wait(exc: BaseException) -> bool:
    """Whether `exc` is SQLite giving up its wait for another connection's lock (busy or locked)."""
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _this_host() -> str:
    """The host name and PID namespace: a PID means the same process only within both."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


# The owners of the ledgers open in this process. A lease that names this process's pid but another
# owner was left by an earlier process with the same pid (a container's PID 1, restarted).
_OPEN_OWNERS: set[str] = set()


def _dead(owner: str, host: str, pid: int) -> bool:
    """Whether a lease holder is known to be gone: a process of this host that no longer runs."""
    if host != _this_host():
        return False
    if pid == os.getpid():
        return owner not in _OPEN_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class LocalBudgetStore:
    """Counters in this process's memory, written behind to the gateway's SQL database (the default).

    `reserve`, `adjust`, `started` and `used` never wait on I/O: each is a few dict operations under
    a lock that only the flush thread's snapshot contends for. One process owns the ledger of a
    database: the store takes a lease row at construction, renews it with every flush and releases
    it at `aclose`. Expiry is judged by the callers' clock (`now`), as in the other stores.
    """

    def __init__(
        self, engine: Engine, *, flush_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Take the ledger's lease, load the live counters and start the flush thread.

        Raises:
            ConfigError: another gateway process owns this database's ledger and is alive.
            ValueError: the database is neither SQLite nor PostgreSQL.
            SQLAlchemyError: the database cannot be reached.
        """
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"budget counters need SQLite or PostgreSQL, not {dialect}")
        self._engine = engine
        insert_of = sqlite.insert if dialect == "sqlite" else postgresql.insert
        stmt = insert_of(_T)
        self._upsert = stmt.on_conflict_do_update(
            index_elements=[_T.c.key],
            set_={"used": stmt.excluded.used, "expires_at": stmt.excluded.expires_at},
        )
        self._flush_s = flush_s
        self._fail_after = FAIL_AFTER_FLUSHES * flush_s
        self._clock = clock
        self._owner = uuid.uuid4().hex
        self._counters: dict[str, _Counter] = {}
        self._dirty: set[str] = set()
        # Guards `_counters` and `_dirty` between the event loop and the flush thread's snapshot.
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: the thread's, or the last at close
        self._now = 0.0  # the latest caller clock seen: expired counters are pruned by it
        self._pruned_at = clock()
        self._failing = False
        self._lagging = False
        self._saving_since: float | None = None  # when the save in progress began (caller clock)
        self._lost = False
        self._closed = False
        # Set when this store took over the lease of an owner that did not release it (it crashed):
        # that owner's last save (wall clock); what it counted after that is recounted (`recount`).
        self.recover_since: float | None = None
        SQLModel.metadata.create_all(engine, tables=[_T, _L])
        self._claim()
        _OPEN_OWNERS.add(self._owner)
        self._flushed_at = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_every, name="budget-ledger-flush", daemon=True)
        self._thread.start()

    # --- the lease and the load ---

    def _claim(self) -> None:
        host, pid, wall = _this_host(), os.getpid(), time.time()
        try:
            with self._engine.begin() as conn:
                held = conn.execute(
                    select(_L.c.owner, _L.c.host, _L.c.pid, _L.c.heartbeat).where(_L.c.name == LEDGER)
                ).first()
                mine = {"owner": self._owner, "host": host, "pid": pid, "heartbeat": wall}
                if held is None:
                    conn.execute(insert(_L).values(name=LEDGER, **mine))
                else:
                    age = wall - float(held.heartbeat)
                    if age < STALE_AFTER_FLUSHES * self._flush_s and not _dead(
                        held.owner, held.host, held.pid
                    ):
                        raise ConfigError(_held_message(held.host, held.pid, age, self._flush_s))
                    taken = conn.execute(
                        update(_L)
                        .where(
                            _L.c.name == LEDGER, _L.c.owner == held.owner, _L.c.heartbeat == held.heartbeat
                        )
                        .values(**mine)
                    )
                    if taken.rowcount != 1:
                        raise ConfigError(
                            "another gateway process took the budget ledger lease at the same time"
                        )
                    self.recover_since = float(held.heartbeat)
                rows = conn.execute(
                    select(_T.c.key, _T.c.used, _T.c.expires_at).where(_T.c.expires_at > wall)
                )
                self._counters = {str(k): _Counter(int(u), float(e)) for k, u, e in rows}
        except IntegrityError as exc:  # another process inserted the lease between our read and insert
            raise ConfigError(
                "another gateway process took the budget ledger lease at the same time"
            ) from exc

    # --- the counters (on the event loop) ---

    def _admitting(self, keys: Sequence[str]) -> None:
        # Fail closed: counting that cannot be saved, or a ledger another process owns now, admits nothing.
        if (
            self._lost
            or self._closed
            or (self._clock() - self._flushed_at > self._fail_after and self._cannot_save())
        ):
            raise Unavailable("budget store unavailable: the call was not forwarded")
        for key in keys:
            if len(key) > KEY_MAX:  # it could never be saved, and would fail every flush after it
                raise Unavailable(
                    f"budget counter key longer than {KEY_MAX} characters: the call was not forwarded"
                )

    def _cannot_save(self) -> bool:
        # Saving fails, hangs, or nothing saves any more. Lag behind a busy database's write lock (the
        # audit log's ingest holds it under load) is no reason to refuse: the counts are in memory,
        # and what a crash loses of them is recounted from the audit log at the next start.
        saving_since = self._saving_since
        return (
            self._failing
            or not self._thread.is_alive()
            or (saving_since is not None and self._clock() - saving_since > self._fail_after + HUNG_AFTER_S)
        )

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        """Take every charge, or none.

        Raises:
            Unavailable: saving the counters has failed for too long, another process took over
                the ledger, or a counter key is too long to be saved.
        """
        self._admitting([c.key for c in charges])
        with self._lock:
            counters = self._counters
            for index, charge in enumerate(charges):
                counter = counters.get(charge.key)
                used = counter.used if counter is not None and counter.expires_at > now else 0
                if not admits(used, charge.amount, charge.limit):
                    return Shortfall(index, used)
            for charge in charges:
                counter = counters.get(charge.key)
                if counter is None or counter.expires_at <= now:
                    counters[charge.key] = _Counter(charge.amount, charge.expires_at)
                else:
                    counter.used += charge.amount
                self._dirty.add(charge.key)
            if now > self._now:
                self._now = now
        return None

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add `delta` to each counter that still exists (never refused: it counts what happened)."""
        with self._lock:
            for key, delta in deltas:
                counter = self._counters.get(key)
                if counter is not None:
                    counter.used += delta
                    self._dirty.add(key)

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """The first `now` recorded under `key` (millisecond precision).

        Raises:
            Unavailable: as for `reserve`.
        """
        self._admitting([key])
        with self._lock:
            counter = self._counters.get(key)
            if counter is None or counter.expires_at <= now:
                counter = self._counters[key] = _Counter(int(now * 1000), expires_at)
                self._dirty.add(key)
            if now > self._now:
                self._now = now
            return counter.used / 1000

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]:
        """Current values of the live counters among `keys` (absent: nothing used yet)."""
        at = time.time() if now is None else now
        with self._lock:
            found = ((k, self._counters.get(k)) for k in keys)
            return {k: c.used for k, c in found if c is not None and c.expires_at > at}

    # --- recovery from a crash ---

    def recount(
        self, rules: Sequence[BudgetRule], records: Iterable[Mapping[str, Any]], run_ttl_s: float
    ) -> int:
        """Add what the audit records after `recover_since` say was spent, then save (blocking).

        A crashed owner's counting since its last save is lost from the table, never from the audit
        log: every forwarded call has a durable `decision` record, which the audit log's start-up
        replays into SQL. Each allowed decision counts one call on every budget it falls under now
        (the rules in force, at the record's time); an outcome that reports tokens or cost adds them.
        A call that was in flight when the owner saved may be counted twice: after a crash the counts
        are at least what was spent, never less. Returns the number of calls counted.
        """
        wall = time.time()
        calls = 0
        with self._lock:
            for record in records:
                if record["decision"] != "allowed" or not record["subject"]:
                    continue
                at = datetime.fromisoformat(record["time"]).timestamp()
                call = Call(
                    protocol=record["protocol"],
                    action=record["action"],
                    resource=record["resource"],
                    upstream=record["upstream"],
                    method=record["method"],
                    run_id=record["run_id"],
                    session_id=record["session_id"],
                    principal=Principal(
                        record["subject"], client_id=record["client_id"], roles=tuple(record["roles"])
                    ),
                )
                amounts: dict[Metric, int]
                if record["event"] == "decision":
                    amounts = {"calls": 1}
                    calls += 1
                    self._recount_start(rules, call, at, run_ttl_s)
                else:
                    amounts = {
                        "tokens": max(record["tokens"] or 0, 0),
                        "cost": max(round((record["cost"] or 0.0) * COST_SCALE), 0),
                    }
                for charge in plan(rules, call, at, run_ttl_s):
                    amount = amounts.get(charge.metric, 0)
                    if amount == 0 or charge.expires_at <= wall:
                        continue
                    counter = self._counters.get(charge.key)
                    if counter is None or counter.expires_at <= wall:
                        self._counters[charge.key] = _Counter(amount, charge.expires_at)
                    else:
                        counter.used += amount
                    self._dirty.add(charge.key)
        # Saved at once: a second crash before the first save would recount from this store's own
        # lease, after the records counted here.
        if not self.flush():
            log.error("budget ledger: the recounted counters could not be saved yet")
        return calls

    def _recount_start(self, rules: Sequence[BudgetRule], call: Call, at: float, run_ttl_s: float) -> None:
        # A run under a duration budget that started after the last save starts at its first record.
        timed = [r for r in rules if r.duration_s is not None]
        if not timed or call.action not in SPENDING_ACTIONS:
            return
        for target in targets(timed, call.principal, run_key(call), call.resource, at):
            key = target.key("started")
            if key not in self._counters:
                self._counters[key] = _Counter(int(at * 1000), at + run_ttl_s)
                self._dirty.add(key)

    # --- write-behind (the flush thread) ---

    def _flush_every(self) -> None:
        while not self._stop.wait(self._flush_s):
            self.flush()

    def flush(self) -> bool:
        """Write the changed counters, delete expired ones now and then, renew the lease (blocking).

        Returns whether it succeeded; failures are logged and the changes kept for the next flush.
        """
        with self._flushing:
            if self._lost:
                return False
            started = self._saving_since = self._clock()
            try:
                return self._save(started)
            finally:
                self._saving_since = None

    def _save(self, started: float) -> bool:
        with self._lock:
            # Taken with the snapshot: every call counted in it was reserved before this moment,
            # so a crash is recounted from the decision records after it (the heartbeat).
            wall = time.time()
            dirty, self._dirty = self._dirty, set()
            rows = [
                {"key": k, "used": min(max(c.used, _BIGINT[0]), _BIGINT[1]), "expires_at": c.expires_at}
                for k in dirty
                if (c := self._counters.get(k)) is not None
            ]
            prune = self._now if started - self._pruned_at >= PRUNE_EVERY_S else None
            if prune is not None:
                self._counters = {k: c for k, c in self._counters.items() if c.expires_at > prune}
        try:
            with self._engine.begin() as conn:
                renewed = conn.execute(
                    update(_L).where(_L.c.name == LEDGER, _L.c.owner == self._owner).values(heartbeat=wall)
                )
                if renewed.rowcount != 1:
                    raise _LeaseLost
                if rows:
                    conn.execute(self._upsert, rows)
                if prune is not None:
                    conn.execute(delete(_T).where(_T.c.expires_at <= prune))
        except _LeaseLost:
            self._lost = True
            log.error(
                "budget ledger: another gateway process took over this database's counters; "
                "this one refuses every budgeted call (restart it, or give budgets.store sql)"
            )
            return False
        except Exception as exc:  # whatever it is, the thread must live on to retry
            with self._lock:
                self._dirty |= dirty
            if _lock_wait(exc):
                self._note_lag()
                return False
            if not self._failing:
                self._failing = True
                log.warning(
                    "budget ledger: saving counters failed; retrying every %gs, refusing budgeted "
                    "calls once nothing was saved for %gs",
                    self._flush_s,
                    self._fail_after,
                    exc_info=True,
                )
            return False
        lag = self._note_lag()
        if self._failing or (self._lagging and lag <= self._fail_after):
            self._failing = self._lagging = False
            log.warning("budget ledger: counters saved again, %.1fs after the last save", lag)
        self._flushed_at = started
        if prune is not None:
            self._pruned_at = started
        return True

    def _note_lag(self) -> float:
        # A save that waited long for the database (another writer's lock, a loaded process) or gave
        # up waiting: said once while it lasts, never a refusal by itself.
        lag = self._clock() - self._flushed_at
        if lag > self._fail_after and not self._lagging and not self._failing:
            self._lagging = True
            log.warning(
                "budget ledger: saving counters lags %.1fs behind (the database is busy: another writer "
                "holds its write lock); counting goes on in memory, and a crash is recounted from the "
                "audit log",
                lag,
            )
        return lag

    def _close(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self._lost:
            self._save_and_release()
        # Closed: a lease that still names it is dead to this process's next ledger.
        _OPEN_OWNERS.discard(self._owner)

    def _save_and_release(self) -> None:
        if not self.flush():
            log.error("budget ledger: the last %gs of counting could not be saved", self._flush_s)
            return
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(_L).where(_L.c.name == LEDGER, _L.c.owner == self._owner))
        except SQLAlchemyError:
            log.warning("budget ledger: releasing the lease failed; it expires by itself", exc_info=True)

    async def aclose(self) -> None:
        """Stop the flush thread, write the last changes and release the lease."""
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._close)


def _held_message(host: str, pid: int, age: float, flush_s: float) -> str:
    return (
        f"budgets.store is local and another gateway process (pid {pid} on {host.split()[0]}, last seen "
        f"{age:.1f}s ago) owns the budget counters of this database: only one process may. Stop it, "
        f"or choose budgets.store sql or redis for several processes; a crashed owner's lease is "
        f"taken over after {STALE_AFTER_FLUSHES * flush_s:g}s."
    )


# KEYS: the counters; ARGV: amount, limit, ttl in ms for each. Returns {index, used} of the first
# charge that does not fit (0-based), or {-1, 0} once every counter has been added to.
_RESERVE = """
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  if used + amount > limit or used >= limit then
    return {i - 1, used}
  end
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
  else
    redis.call('SET', KEYS[i], ARGV[3 * i - 2], 'PX', ARGV[3 * i])
  end
end
return {-1, 0}
"""
# A counter that has expired stays gone: a late settle must not resurrect it without a TTL.
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[i])
  end
end
return 0
"""
_STARTED = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
"""


class RedisBudgetStore:
    """Counters in Redis, shared by every gateway node; each operation is one Lua script."""

    def __init__(self, url: str, prefix: str, settings: RedisSettings | None = None) -> None:
        self._redis = redis_client(url, settings)
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._adjust = self._redis.register_script(_ADJUST)
        self._started = self._redis.register_script(_STARTED)

    def _keys(self, keys: Sequence[str]) -> list[str]:
        return [self._prefix + k for k in keys]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable("budget store unavailable: the call was not forwarded") from exc

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        """Take every charge, or none.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        args: list[Any] = []
        for charge in charges:
            ttl_ms = max(1, int((charge.expires_at - now) * 1000))
            args.extend((charge.amount, charge.limit, ttl_ms))
        index, used = await self._call(self._reserve, self._keys([c.key for c in charges]), args)
        if int(index) < 0:
            return None
        return Shortfall(int(index), int(used))

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add `delta` to each counter that still exists.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        if deltas:
            await self._call(self._adjust, self._keys([k for k, _ in deltas]), [d for _, d in deltas])

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """The first `now` recorded under `key` (millisecond precision).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        ttl_ms = max(1, int((expires_at - now) * 1000))
        value = await self._call(self._started, self._keys([key]), [int(now * 1000), ttl_ms])
        return int(value) / 1000

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]:
        """Current values of the live counters among `keys`.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        from redis.exceptions import RedisError

        if not keys:
            return {}
        try:
            values = await self._redis.mget(self._keys(keys))
        except (RedisError, OSError) as exc:
            raise Unavailable("budget store unavailable") from exc
        return {k: int(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def aclose(self) -> None:
        await self._redis.aclose()


def budget_store(
    settings: BudgetSettings,
    engine: Engine,
    shared_redis_url: str | None = None,
    *,
    database: DatabaseSettings | None = None,
    redis: RedisSettings | None = None,
) -> BudgetStore:
    """The store `settings.store` names; Redis at `budgets.redis_url`, else the gateway's `redis_url`.

    `database` and `redis` give the time limit of a SQL store's calls and the Redis client's limits.

    Raises:
        ConfigError: the Redis store is chosen but no Redis URL is set; or the local store is chosen
            and another live process owns this database's ledger.
    """
    if settings.store == "redis":
        url = settings.redis_url or shared_redis_url
        if not url:
            raise ConfigError("budgets.store is redis: set budgets.redis_url or redis_url")
        return RedisBudgetStore(url, settings.redis_prefix, redis)
    if settings.store == "local":
        return LocalBudgetStore(engine, flush_s=settings.flush_s)
    return SqlBudgetStore(engine, timeout_s=(database or DatabaseSettings()).statement_timeout_s)


def budget_reader(
    settings: BudgetSettings, engine: Engine, shared_redis_url: str | None = None
) -> BudgetStore:
    """A store for reading counters from another process (`agentgw budget show`).

    A local ledger belongs to the gateway process; its counters are read from the table it writes
    to (at most `flush_s` behind), without taking its lease.

    Raises:
        ConfigError: as for `budget_store`.
    """
    if settings.store == "local":
        return SqlBudgetStore(engine)
    return budget_store(settings, engine, shared_redis_url)
