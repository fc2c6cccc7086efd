"""Budget counters in this process's memory, written behind to the gateway's SQL database.

The default store. The counters in memory are the truth; a reservation is a few dict operations
with no await between check and add, so it is atomic on the event loop. A thread writes changed
counters to the `budget_counter` table every `flush_s` and at close, and they are loaded from it at
start; what a crash lost since the last save is recounted from the audit log's decision records
(`recount`). One process owns the ledger of a database (a lease row); a ledger whose saving fails
refuses calls (waiting for a busy write lock is not failing).
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
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine, Float, Integer, String, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from agentgw.call import Call, Principal
from agentgw.errors import ConfigError, Unavailable
from agentgw.records.budget import (
    COST_SCALE,
    SPENDING_ACTIONS,
    BudgetRule,
    Charge,
    Metric,
    Shortfall,
    admits,
    plan,
    run_key,
    targets,
)
from agentgw.storage.budget.table import KEY_MAX, PRUNE_EVERY_S
from agentgw.storage.budget.table import counter_table as _T

__all__ = ["BudgetLedgerLease", "LocalBudgetStore"]

log = logging.getLogger(__name__)


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


# A local ledger whose saving has failed for this many flush intervals refuses calls; its lease
# counts as abandoned after twice as long, so an owner that cannot write is already refusing calls
# when another process takes over (with room for clock skew between hosts). Waiting for the
# database's write lock is not failing: it is logged once saving lags this far behind.
FAIL_AFTER_FLUSHES = 5
STALE_AFTER_FLUSHES = 10
# One save that has run this much longer than the fail-closed bound hangs (SQLite's own lock waits
# end after its busy timeout, 5 s, and count as lag).
HUNG_AFTER_S = 10.0
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
    """Counters in this process's memory, written behind to the gateway's SQL database.

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
