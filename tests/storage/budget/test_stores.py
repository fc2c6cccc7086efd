"""Budget counters: all-or-nothing reservations on SQLite, PostgreSQL and Redis, also across processes,
and in the local ledger (in memory, written behind to SQLite)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from agentgw.call import Principal
from agentgw.filters.budget import BudgetStore
from agentgw.records.budget import BudgetRule, Charge, Shortfall, targets
from agentgw.storage import make_engine
from agentgw.storage.budget import LocalBudgetStore, RedisBudgetStore, SqlBudgetStore

NOW = 1_767_268_800.0
REDIS = "redis://127.0.0.1:6379/0"


def charge(key: str, limit: int, amount: int = 1, expires_at: float = NOW + 60) -> Charge:
    rule = BudgetRule(name="r", calls=limit)
    target = targets([rule], Principal(subject="s"), "run", "x", NOW)[0]
    return Charge(key, amount, limit, expires_at, target, "calls")


def where_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL, or a Redis key prefix unique to the test."""
    if kind in ("sqlite", "local"):
        return f"sqlite:///{tmp_path / 'counters.db'}"
    if kind == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"agentgw-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["sqlite", "postgres", "redis", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where) for every store."""
    return request.param, where_of(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where) for the stores that several processes share (a local ledger has one owner)."""
    return request.param, where_of(request.param, request, tmp_path)


ENGINES: list[Engine] = []


def open_store(kind: str, where: str) -> BudgetStore:
    if kind == "redis":
        return RedisBudgetStore(REDIS, where)
    engine = make_engine(where)
    ENGINES.append(engine)
    return LocalBudgetStore(engine) if kind == "local" else SqlBudgetStore(engine)


@pytest.fixture(autouse=True)
def dispose_engines() -> Iterator[None]:
    yield
    while ENGINES:
        ENGINES.pop().dispose()


@pytest.fixture
async def store(backend: tuple[str, str]) -> AsyncIterator[BudgetStore]:
    built = open_store(*backend)
    yield built
    await built.aclose()


def key() -> str:
    return f"k-{uuid.uuid4().hex}"


async def test_a_hundred_concurrent_reservations_on_a_limit_of_ten_take_exactly_ten(
    store: BudgetStore,
) -> None:
    k = key()
    results = await asyncio.gather(*(store.reserve([charge(k, 10)], NOW) for _ in range(100)))
    assert results.count(None) == 10
    assert all(r == Shortfall(0, 10) for r in results if r is not None)
    assert await store.used([k], NOW) == {k: 10}


async def test_a_reservation_takes_all_charges_or_none(store: BudgetStore) -> None:
    wide, narrow = key(), key()
    assert await store.reserve([charge(wide, 10), charge(narrow, 1)], NOW) is None
    refused = await store.reserve([charge(wide, 10), charge(narrow, 1)], NOW)
    assert refused == Shortfall(1, 1)
    assert await store.used([wide, narrow], NOW) == {wide: 1, narrow: 1}


async def test_an_amount_larger_than_what_is_left_is_refused(store: BudgetStore) -> None:
    k = key()
    assert await store.reserve([charge(k, 100, amount=60)], NOW) is None
    assert await store.reserve([charge(k, 100, amount=50)], NOW) == Shortfall(0, 60)
    assert await store.reserve([charge(k, 100, amount=40)], NOW) is None


async def test_adjustments_settle_and_release(store: BudgetStore) -> None:
    k, gone = key(), key()
    assert await store.reserve([charge(k, 100, amount=10)], NOW) is None
    await store.adjust([(k, 25), (gone, 5)])
    await store.adjust([(k, -3)])
    assert await store.used([k, gone], NOW) == {k: 32}


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "local"])  # Redis expires keys by its own clock
async def test_an_expired_counter_starts_again_from_zero(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = open_store(kind, where_of(kind, request, tmp_path))
    k = key()
    assert await store.reserve([charge(k, 1, expires_at=NOW + 60)], NOW) is None
    assert await store.reserve([charge(k, 1, expires_at=NOW + 60)], NOW + 30) == Shortfall(0, 1)
    assert await store.used([k], NOW + 60) == {}  # expired: absent
    assert await store.reserve([charge(k, 1, expires_at=NOW + 120)], NOW + 60) is None
    assert await store.used([k], NOW + 60) == {k: 1}
    await store.aclose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_counter_removed_by_another_process_is_created_again_not_refused(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = f"sqlite:///{tmp_path / 'c.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_store(kind, where)
    other = open_store(kind, where)
    k = key()
    assert await store.reserve([charge(k, 5)], NOW) is None  # this process now knows the counter
    assert isinstance(other, SqlBudgetStore)
    with other._engine.begin() as conn:  # another process's clean-up takes it away
        conn.exec_driver_sql(
            "DELETE FROM budget_counter WHERE key = ?"
            if kind == "sqlite"
            else "DELETE FROM budget_counter WHERE key = %s",
            (k,),
        )
    assert await store.reserve([charge(k, 5)], NOW) is None
    assert await store.used([k], NOW) == {k: 1}


async def test_a_redis_counter_carries_the_time_to_live_of_its_window() -> None:
    import redis.asyncio

    prefix = f"agentgw-test:{uuid.uuid4().hex}:"
    store = RedisBudgetStore(REDIS, prefix)
    k = key()
    assert await store.reserve([charge(k, 5, expires_at=NOW + 42)], NOW) is None
    client = redis.asyncio.Redis.from_url(REDIS)
    ttl = await client.pttl(prefix + k)
    await client.aclose()
    await store.aclose()
    assert 40_000 < ttl <= 42_000


async def test_the_first_start_time_of_a_run_sticks(store: BudgetStore) -> None:
    k = key()
    assert await store.started(k, NOW, NOW + 3600) == NOW
    assert await store.started(k, NOW + 50, NOW + 3650) == NOW


WORKER = """
import asyncio, sys
from tests.storage.budget.test_stores import open_store, charge

async def main() -> None:
    store = open_store(sys.argv[1], sys.argv[2])
    one = [charge(sys.argv[3], 10)]
    results = await asyncio.gather(*(store.reserve(one, float(sys.argv[4])) for _ in range(50)))
    await store.aclose()
    print(results.count(None))

asyncio.run(main())
"""


def test_two_processes_racing_for_a_limit_of_ten_take_exactly_ten(shared_backend: tuple[str, str]) -> None:
    kind, where = shared_backend
    if kind != "redis":
        open_store(kind, where)  # the table exists before the race starts
    k = key()
    root = Path(__file__).resolve().parents[3]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, where, k, str(NOW)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    taken = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        taken.append(int(out.strip()))
    assert sum(taken) == 10
