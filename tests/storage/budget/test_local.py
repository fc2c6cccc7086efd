"""The local budget ledger: counters in memory, written behind to SQLite or PostgreSQL, owned by one
process, refusing calls when it cannot save them."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, insert, select, update

from agentgw.call import Principal
from agentgw.errors import ConfigError, Unavailable
from agentgw.records.audit import timestamp
from agentgw.records.budget import BudgetRule, BudgetSettings, Shortfall, targets
from agentgw.storage import make_engine
from agentgw.storage.budget import LocalBudgetStore, SqlBudgetStore, budget_reader, budget_store
from agentgw.storage.budget.local import (
    FAIL_AFTER_FLUSHES,
    HUNG_AFTER_S,
    LEDGER,
    STALE_AFTER_FLUSHES,
    BudgetLedgerLease,
    _this_host,
)
from agentgw.storage.budget.table import PRUNE_EVERY_S, BudgetCounter
from tests.storage.budget.test_stores import charge
from tests.support.crash import kill_when_ready

_T = BudgetCounter.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped
_L = BudgetLedgerLease.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The database a ledger is written to; left without a lease, the table as it was."""
    url = (
        f"sqlite:///{tmp_path / 'gw.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = make_engine(url)
    yield engine
    BudgetLedgerLease.metadata.create_all(engine, tables=[_T, _L])
    with engine.begin() as conn:
        conn.execute(delete(_L))
    engine.dispose()


def key() -> str:
    return f"k-{uuid.uuid4().hex}"


def stored(engine: Engine, k: str) -> int | None:
    with engine.connect() as conn:
        value = conn.execute(select(_T.c.used).where(_T.c.key == k)).scalar_one_or_none()
    return None if value is None else int(value)


def lease(engine: Engine) -> dict[str, object] | None:
    with engine.connect() as conn:
        row = conn.execute(select(_L).where(_L.c.name == LEDGER)).mappings().first()
    return None if row is None else dict(row)


def quiet(engine: Engine, clock: Clock | None = None) -> LocalBudgetStore:
    """A ledger whose flush thread never runs by itself: the test flushes."""
    if clock is None:
        return LocalBudgetStore(engine, flush_s=3600)
    return LocalBudgetStore(engine, flush_s=3600, clock=clock)


def on_flush(store: LocalBudgetStore) -> threading.Event:
    """An event set by the next successful flush of the store's own thread."""
    done = threading.Event()
    real = store.flush

    def flush() -> bool:
        ok = real()
        if ok:
            done.set()
        return ok

    store.flush = flush  # type: ignore[method-assign]  # observe the thread's calls
    return done


async def test_the_flush_thread_writes_counters_behind_every_flush_interval(database: Engine) -> None:
    store = LocalBudgetStore(database, flush_s=0.05)
    k = key()
    flushed = on_flush(store)
    assert await store.reserve([charge(k, 10, amount=3)], time.time()) is None
    assert await asyncio.to_thread(flushed.wait, 10)
    assert stored(database, k) == 3
    await store.aclose()


async def test_counters_survive_a_restart_and_the_lease_is_released_at_close(database: Engine) -> None:
    now = time.time()
    k, run = key(), key()
    first = quiet(database)
    assert lease(database) is not None
    assert await first.reserve([charge(k, 10, amount=4, expires_at=now + 60)], now) is None
    assert await first.started(run, now, now + 60) == pytest.approx(now, abs=0.001)
    await first.aclose()  # the last changes are written at close
    assert lease(database) is None
    again = quiet(database)
    assert await again.used([k], now) == {k: 4}
    assert await again.reserve([charge(k, 10, amount=7, expires_at=now + 60)], now) == Shortfall(0, 4)
    assert await again.started(run, now + 5, now + 65) == pytest.approx(now, abs=0.001)
    await again.aclose()


async def test_a_hundred_concurrent_reservations_stay_ten_after_a_restart(database: Engine) -> None:
    now = time.time()
    k = key()
    store = quiet(database)
    results = await asyncio.gather(
        *(store.reserve([charge(k, 10, expires_at=now + 60)], now) for _ in range(100))
    )
    assert results.count(None) == 10
    await store.aclose()
    again = quiet(database)
    results = await asyncio.gather(
        *(again.reserve([charge(k, 10, expires_at=now + 60)], now) for _ in range(100))
    )
    assert results.count(None) == 0
    await again.aclose()


async def test_a_second_ledger_on_the_same_database_is_refused_until_the_first_closes(
    database: Engine,
) -> None:
    first = quiet(database)
    with pytest.raises(ConfigError, match=r"owns the budget counters.*budgets.store sql or redis"):
        quiet(database)
    await first.aclose()
    second = quiet(database)
    await second.aclose()


async def test_another_process_reads_a_local_ledger_from_its_table_without_taking_it(
    database: Engine,
) -> None:
    settings = BudgetSettings()
    assert settings.store == "local"
    owner = budget_store(settings, database)
    assert isinstance(owner, LocalBudgetStore)
    now = time.time()
    k = key()
    assert await owner.reserve([charge(k, 10, amount=2, expires_at=now + 60)], now) is None
    assert await asyncio.to_thread(owner.flush)
    reader = budget_reader(settings, database)
    assert isinstance(reader, SqlBudgetStore)
    assert await reader.used([k], now) == {k: 2}
    await reader.aclose()
    await owner.aclose()
    shared = BudgetSettings(store="sql")
    assert isinstance(budget_store(shared, database), SqlBudgetStore)
    assert isinstance(budget_reader(shared, database), SqlBudgetStore)


def hold_lease(engine: Engine, *, host: str, pid: int, age: float) -> None:
    BudgetLedgerLease.metadata.create_all(engine, tables=[_T, _L])
    with engine.begin() as conn:
        conn.execute(delete(_L))
        conn.execute(
            insert(_L).values(name=LEDGER, owner="earlier", host=host, pid=pid, heartbeat=time.time() - age)
        )


async def test_a_fresh_lease_of_another_host_is_refused_and_a_stale_one_taken_over(database: Engine) -> None:
    hold_lease(database, host="elsewhere", pid=os.getpid(), age=0.5)
    with pytest.raises(ConfigError, match=r"pid \d+ on elsewhere, last seen 0\.\ds ago"):
        LocalBudgetStore(database, flush_s=1.0)
    hold_lease(database, host="elsewhere", pid=os.getpid(), age=STALE_AFTER_FLUSHES * 1.0 + 1)
    store = LocalBudgetStore(database, flush_s=1.0)
    held = lease(database)
    assert held is not None and held["host"] == _this_host() and held["pid"] == os.getpid()
    await store.aclose()


async def test_the_fresh_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(database: Engine) -> None:
    gone = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os; print(os.getpid())", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await gone.communicate()
    hold_lease(database, host=_this_host(), pid=int(out), age=0.1)
    store = quiet(database)
    await store.aclose()
    # An earlier process with this process's pid (a restarted container's PID 1) is gone too.
    hold_lease(database, host=_this_host(), pid=os.getpid(), age=0.1)
    store = quiet(database)
    await store.aclose()


async def test_a_ledger_that_cannot_save_refuses_calls_until_it_saves_again(
    database: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = quiet(database, clock)
    now = time.time()
    k, later = key(), key()
    assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None
    _T.drop(database)  # the database loses the table: nothing can be saved
    with caplog.at_level(logging.WARNING, "agentgw.storage.budget.local"):
        assert not await asyncio.to_thread(store.flush)
    assert "saving counters failed" in caplog.text
    clock.now += FAIL_AFTER_FLUSHES * 3600 - 1
    assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None  # within the bound
    clock.now += 2
    with pytest.raises(Unavailable, match="budget store unavailable"):
        await store.reserve([charge(later, 10, expires_at=now + 60)], now)
    with pytest.raises(Unavailable):
        await store.started(later, now, now + 60)
    await store.adjust([(k, 5)])  # what happened is still counted
    _T.create(database)
    assert await asyncio.to_thread(store.flush)
    assert await store.reserve([charge(later, 10, expires_at=now + 60)], now) is None
    assert await asyncio.to_thread(store.flush)
    assert stored(database, k) == 7  # the changes made while failing were kept for the next flush
    assert stored(database, later) == 1
    await store.aclose()


async def test_a_save_waiting_for_another_writers_lock_refuses_no_call_and_says_it_lags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.db"
    engine = make_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _short_lock_wait(conn: Any, _record: Any) -> None:
        conn.execute("PRAGMA busy_timeout=20")  # SQLite gives up waiting at once here, as after 5 s

    clock = Clock()
    store = quiet(engine, clock)
    now = time.time()
    k = key()
    assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None
    writer = sqlite3.connect(path, isolation_level=None)  # another writer (the audit ingest) holds the lock
    writer.execute("BEGIN IMMEDIATE")
    clock.now += FAIL_AFTER_FLUSHES * 3600 + 1
    with caplog.at_level(logging.WARNING, "agentgw.storage.budget.local"):
        assert not await asyncio.to_thread(store.flush)
        assert "saving counters lags" in caplog.text and "failed" not in caplog.text
        assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None
        writer.execute("ROLLBACK")
        assert await asyncio.to_thread(store.flush)  # a late save: lagging still
        assert "counters saved again" not in caplog.text
        assert await asyncio.to_thread(store.flush)  # on time again
    writer.close()
    assert caplog.text.count("saving counters lags") == 1
    assert "counters saved again" in caplog.text
    assert stored(engine, k) == 2
    await store.aclose()
    engine.dispose()


async def test_a_save_that_hangs_refuses_calls_until_it_returns(database: Engine) -> None:
    clock = Clock()
    store = quiet(database, clock)
    now = time.time()
    entered, release = threading.Event(), threading.Event()

    def hang(*_: Any) -> None:  # the database does not answer (a network partition, a stuck disk)
        if not release.is_set():
            entered.set()
            release.wait(10)

    event.listen(database, "before_cursor_execute", hang)
    saving = asyncio.create_task(asyncio.to_thread(store.flush))
    assert await asyncio.to_thread(entered.wait, 10)
    clock.now += FAIL_AFTER_FLUSHES * 3600 + HUNG_AFTER_S + 1
    with pytest.raises(Unavailable, match="budget store unavailable"):
        await store.reserve([charge(key(), 10, expires_at=now + 60)], now)
    release.set()
    assert await saving
    event.remove(database, "before_cursor_execute", hang)
    assert await store.reserve([charge(key(), 10, expires_at=now + 60)], now) is None
    await store.aclose()


def decision(subject: str, run: str, at: float, **fields: Any) -> dict[str, Any]:
    """An audit record as `iter_records` returns it."""
    return {
        "time": timestamp(at),
        "event": "decision",
        "decision": "allowed",
        "protocol": "mcp",
        "action": "call",
        "resource": "mcp:github/create_issue",
        "upstream": "github",
        "method": "tools/call",
        "run_id": run,
        "session_id": None,
        "subject": subject,
        "client_id": None,
        "roles": [],
        "tokens": None,
        "cost": None,
    } | fields


async def test_what_a_crashed_owner_spent_is_recounted_from_the_audit_records(database: Engine) -> None:
    gone = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os; print(os.getpid())", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await gone.communicate()
    hold_lease(database, host=_this_host(), pid=int(out), age=3)
    store = quiet(database)
    assert store.recover_since == pytest.approx(time.time() - 3, abs=1)
    now = time.time()
    run = key()
    rules = [
        BudgetRule(name="run", calls=10, tokens=1000, duration_s=600),
        BudgetRule(name="rate", per="subject", window="day", calls=100),
    ]
    records = [
        decision("user:alice", run, now - 2),
        decision("user:alice", run, now - 1),
        decision("user:alice", run, now - 1, event="outcome", tokens=30),
        decision("user:alice", run, now - 1, decision="denied"),
        decision("user:bob", run, now - 1),
        decision("user:alice", run, now - 1, action="list"),
    ]
    assert store.recount(rules, records, 3600) == 4
    alice = targets(rules, Principal(subject="user:alice"), run, "mcp:github/create_issue", now)
    keys = [alice[0].key("calls"), alice[0].key("tokens"), alice[1].key("calls")]
    assert await store.used(keys, now) == dict(zip(keys, [2, 30, 2], strict=True))
    assert await store.started(alice[0].key("started"), now, now + 60) == pytest.approx(now - 2, abs=0.01)
    assert [stored(database, k) for k in keys] == [2, 30, 2]  # saved at once
    await store.aclose()


async def test_a_ledger_whose_lease_was_taken_refuses_calls_for_good(
    database: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    store = quiet(database)
    now = time.time()
    k = key()
    assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None
    with database.begin() as conn:
        conn.execute(update(_L).values(owner="usurper"))
    with caplog.at_level(logging.ERROR, "agentgw.storage.budget.local"):
        assert not await asyncio.to_thread(store.flush)
    assert "another gateway process took over" in caplog.text
    with pytest.raises(Unavailable):
        await store.reserve([charge(k, 10, expires_at=now + 60)], now)
    assert stored(database, k) is None  # the usurper's counters are not overwritten
    await store.aclose()
    assert lease(database) is not None and lease(database)["owner"] == "usurper"  # type: ignore[index]


async def test_expired_counters_are_pruned_from_memory_and_the_database(database: Engine) -> None:
    clock = Clock()
    store = quiet(database, clock)
    now = time.time()
    old, live = key(), key()
    assert await store.reserve([charge(old, 10, expires_at=now + 60)], now) is None
    assert await store.reserve([charge(live, 10, expires_at=now + 600)], now) is None
    assert await asyncio.to_thread(store.flush)
    assert stored(database, old) == 1
    clock.now += PRUNE_EVERY_S
    assert await store.reserve([charge(live, 10, expires_at=now + 600)], now + 60) is None
    assert await asyncio.to_thread(store.flush)
    assert stored(database, old) is None and stored(database, live) == 2
    assert old not in store._counters
    await store.aclose()


async def test_a_key_too_long_to_save_is_refused_and_a_huge_count_is_saved_clamped(database: Engine) -> None:
    store = quiet(database)
    now = time.time()
    with pytest.raises(Unavailable, match="longer than 512"):
        await store.reserve([charge("k" * 513, 10, expires_at=now + 60)], now)
    k = key()
    assert await store.reserve([charge(k, 10, expires_at=now + 60)], now) is None
    await store.adjust([(k, 10**30)])  # an upstream reporting absurd usage must not stall every flush
    assert await asyncio.to_thread(store.flush)
    assert stored(database, k) == 2**63 - 1
    await store.aclose()


CRASHING_OWNER = """
import asyncio, sys, threading, time
from agentgw.storage import make_engine
from agentgw.storage.budget.local import LocalBudgetStore
from tests.storage.budget.test_stores import charge

async def main() -> None:
    store = LocalBudgetStore(make_engine(sys.argv[1]), flush_s=0.05)
    now = time.time()
    for _ in range(3):
        assert await store.reserve([charge(sys.argv[2], 10, expires_at=now + 600)], now) is None
    flushed = threading.Event()
    real = store.flush
    store.flush = lambda: real() and (flushed.set() or True)
    await asyncio.to_thread(flushed.wait, 10)
    print("flushed", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until killed

asyncio.run(main())
"""


async def test_a_sigkilled_owner_loses_nothing_flushed_and_its_lease_is_taken_over_at_once(
    database: Engine,
) -> None:
    k = key()
    await kill_when_ready(
        CRASHING_OWNER, database.url.render_as_string(hide_password=False), k, ready=b"flushed"
    )
    store = quiet(database)  # a fresh lease, but its holder is a dead process of this host
    assert await store.used([k], time.time()) == {k: 3}
    await store.aclose()
