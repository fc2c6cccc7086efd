"""The budget stage: the plan cache, the exhaustion error, and reserve / settle / release through
real stores (the local ledger, SQLite, Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import (
    BudgetExceeded,
    CredentialError,
    GatewayError,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnreachable,
)
from agentgw.filters.budget import (
    Budget,
    BudgetStore,
    PlanCache,
    StaticRules,
    effective_budgets,
    exhausted,
)
from agentgw.pipeline import CallNext
from agentgw.records.budget import (
    BudgetRule,
    plan,
    targets,
)
from agentgw.storage import make_engine
from agentgw.storage.budget import LocalBudgetStore, RedisBudgetStore, SqlBudgetStore
from agentgw.storage.budget.local import FAIL_AFTER_FLUSHES
from tests.records.test_budget import ALICE, NOON, call


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetStore]:
    if request.param == "local":
        built: BudgetStore = LocalBudgetStore(make_engine(f"sqlite:///{tmp_path / 'budgets.db'}"))
    elif request.param == "sqlite":
        built = SqlBudgetStore(make_engine(f"sqlite:///{tmp_path / 'budgets.db'}"))
    else:
        built = RedisBudgetStore("redis://127.0.0.1:6379/0", f"agentgw-test:{uuid.uuid4().hex}:")
    yield built
    await built.aclose()


def forwarding(counter: list[Call], usage: Usage | None = None) -> CallNext:
    async def terminal(c: Call) -> Reply:
        counter.append(c)
        await asyncio.sleep(0)
        return Reply(payload="ok", usage=usage)

    return terminal


# --- the plan cache ----------------------------------------------------------------------------


def test_a_cached_plan_is_the_plan_of_the_call_it_is_asked_for() -> None:
    rules = (
        BudgetRule(name="alice", per="subject", match="user:alice", window="minute", calls=5),
        BudgetRule(name="devs", per="role", match="role:dev", window="hour", tokens=100),
    )
    cache = PlanCache(3600)
    bob = Principal(subject="user:bob", roles=("role:dev",))
    for made in (
        call(),
        call(principal=bob),
        call("mcp:github/other"),
        call(estimate=Usage(tokens=40)),
        call(principal=Principal(subject="user:alice")),
        call(),
    ):
        assert list(cache.charges(rules, made, NOON)) == plan(rules, made, NOON, 3600)


def test_a_cached_plan_is_planned_again_when_a_window_it_counts_in_ends() -> None:
    rules = (BudgetRule(name="alice", per="subject", window="minute", calls=5),)
    cache = PlanCache(3600)
    first = cache.charges(rules, call(), NOON + 30)
    assert cache.charges(rules, call(), NOON + 59.5) is first
    later = cache.charges(rules, call(), NOON + 60)
    assert later[0].key != first[0].key
    assert later[0].expires_at == NOON + 120
    # A clock set back before the window the plan counted in plans again too.
    assert cache.charges(rules, call(), NOON + 30)[0].key == first[0].key


def test_a_cached_plan_is_planned_again_when_the_rules_change() -> None:
    cache = PlanCache(3600)
    before = (BudgetRule(name="alice", per="subject", window="day", calls=5),)
    after = (BudgetRule(name="alice", per="subject", window="day", calls=7),)
    assert cache.charges(before, call(), NOON)[0].limit == 5
    assert cache.charges(after, call(), NOON)[0].limit == 7
    assert cache.charges((), call(), NOON) == ()


def test_caller_chosen_run_ids_never_grow_the_plan_cache_past_its_bound() -> None:
    rules = (BudgetRule(name="runs", per="run", window="day", calls=5),)
    cache = PlanCache(3600, max_entries=8)
    for n in range(100):
        made = call(run=f"run-{n}")
        assert list(cache.charges(rules, made, NOON)) == plan(rules, made, NOON, 3600)
        assert len(cache._plans) <= 8  # the bound on keys callers choose


def test_a_plan_with_a_windowless_run_budget_is_planned_every_time() -> None:
    # Its counter expires a run TTL after the call that creates it: no earlier call's `now` may stand in.
    rules = (BudgetRule(name="run", calls=10),)
    cache = PlanCache(3600)
    assert cache.charges(rules, call(), NOON)[0].expires_at == NOON + 3600
    assert cache.charges(rules, call(), NOON + 5)[0].expires_at == NOON + 3605


# --- the exhaustion error ----------------------------------------------------------------------


def test_the_exhaustion_error_names_the_budget_and_when_it_resets() -> None:
    rule = BudgetRule(name="alice-rate", per="subject", window="minute", calls=5)
    target = targets([rule], ALICE, None, "mcp:x/y", NOON + 15)[0]
    error = exhausted(target, "calls", 5, 5, NOON + 15)
    assert "alice-rate" in error.message and "2026-01-01T12:01:00Z" in error.message
    assert error.headers == {"Retry-After": "45"}
    assert error.data["resetsAt"] == "2026-01-01T12:01:00Z"
    assert error.data["budget"] == "alice-rate" and error.data["limit"] == 5
    assert error.http_status == 429


def test_a_run_budget_does_not_reset_and_says_so() -> None:
    target = targets([BudgetRule(name="run", calls=3)], ALICE, "r", "mcp:x/y", NOON)[0]
    error = exhausted(target, "calls", 3, 3, NOON)
    assert "does not reset" in error.message
    assert error.headers == {}
    assert error.data["resetsAt"] is None


# --- the stage with real stores ----------------------------------------------------------------


async def test_a_budget_of_ten_forwards_exactly_ten_of_a_hundred_concurrent_calls(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=10)]))
    forwarded: list[Call] = []
    results = await asyncio.gather(
        *(stage(call(run="burst"), forwarding(forwarded)) for _ in range(100)), return_exceptions=True
    )
    assert len(forwarded) == 10
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(refused) == 90
    assert all(r.data["budget"] == "run" for r in refused)


async def test_a_per_minute_budget_resets_when_its_window_ends(store: BudgetStore) -> None:
    clock = Clock(NOON + 10)
    rule = BudgetRule(name="alice-per-minute", per="subject", window="minute", calls=2)
    stage = Budget(store, StaticRules([rule]), clock=clock)
    forwarded: list[Call] = []
    await stage(call(), forwarding(forwarded))
    await stage(call(), forwarding(forwarded))
    with pytest.raises(BudgetExceeded) as refused:
        await stage(call(), forwarding(forwarded))
    assert refused.value.headers["Retry-After"] == "50"
    clock.now = NOON + 60  # the next minute
    await stage(call(), forwarding(forwarded))
    assert len(forwarded) == 3


async def test_tokens_are_settled_from_the_reply_usage(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="tokens", tokens=1000)]))
    forwarded: list[Call] = []
    # The estimate says 100; the upstream reports 600 each time: the true-up counts 600.
    for _ in range(2):
        await stage(call(estimate=Usage(tokens=100)), forwarding(forwarded, Usage(tokens=600)))
    with pytest.raises(BudgetExceeded, match="tokens 1200 of 1000"):
        await stage(call(estimate=Usage(tokens=100)), forwarding(forwarded, Usage(tokens=600)))
    assert len(forwarded) == 2


async def test_a_smaller_actual_cost_gives_back_the_rest_of_the_estimate(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="cost", cost=1.0)]))
    forwarded: list[Call] = []
    # Each call reserves 0.6 but costs 0.1: five calls fit, where without settlement one would.
    for _ in range(5):
        await stage(call(estimate=Usage(cost=0.6)), forwarding(forwarded, Usage(cost=0.1)))
    with pytest.raises(BudgetExceeded, match="cost"):
        await stage(call(estimate=Usage(cost=0.6)), forwarding(forwarded, Usage(cost=0.1)))
    lines = await effective_budgets([BudgetRule(name="cost", cost=1.0)], store, ALICE, "run-1", NOON)
    assert lines[0]["used"] == pytest.approx(0.5)


async def test_a_call_that_never_left_the_gateway_gives_its_reservation_back(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=1)]))

    async def unreachable(_: Call) -> Reply:
        raise UpstreamUnreachable("upstream 'github' is unreachable")

    async def refused_later(_: Call) -> Reply:
        raise CredentialError("upstream 'github': its credential is not configured correctly")

    for broken in (unreachable, refused_later, unreachable):
        with pytest.raises(GatewayError):
            await stage(call(), broken)
    forwarded: list[Call] = []
    await stage(call(), forwarding(forwarded))
    assert len(forwarded) == 1


@pytest.mark.parametrize(
    "failure",
    [
        UpstreamTimeout("upstream 'github' did not answer within 1s"),
        UpstreamError("upstream 'github' answered with something that is not a JSON-RPC response"),
        UpstreamUnauthorized("upstream 'github' refused the gateway's credential"),
        RuntimeError("a crash after the call went out"),
    ],
)
async def test_a_call_that_may_have_reached_the_upstream_stays_charged(
    store: BudgetStore, failure: Exception
) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=1, tokens=100)]))

    async def failing(_: Call) -> Reply:
        raise failure

    with pytest.raises(type(failure)):
        await stage(call(estimate=Usage(tokens=40)), failing)
    with pytest.raises(BudgetExceeded, match="calls 1 of 1"):
        await stage(call(), forwarding([]))
    lines = await effective_budgets([BudgetRule(name="run", tokens=100)], store, ALICE, "run-1", NOON)
    assert lines[0]["used"] == 40


async def test_a_call_whose_caller_went_away_stays_charged(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=1)]))
    started = asyncio.Event()

    async def hanging(_: Call) -> Reply:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never answers")

    task = asyncio.create_task(stage(call(), hanging))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(BudgetExceeded):
        await stage(call(), forwarding([]))


async def test_a_streamed_answer_is_settled_when_it_ends(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="tokens", tokens=100)]))

    async def streaming(_: Call) -> Reply:
        return Reply(payload="stream", streaming=True)

    reply = await stage(call(), streaming)
    await reply.settle(Usage(tokens=150), "ok")
    with pytest.raises(BudgetExceeded, match="tokens 150 of 100"):
        await stage(call(), streaming)


async def test_discovery_passes_an_exhausted_budget(store: BudgetStore) -> None:
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=0)]))
    forwarded: list[Call] = []
    await stage(call(action="list"), forwarding(forwarded))
    await stage(call(action="session"), forwarding(forwarded))
    with pytest.raises(BudgetExceeded):
        await stage(call(), forwarding(forwarded))
    assert len(forwarded) == 2


async def test_a_run_past_its_duration_is_stopped(store: BudgetStore) -> None:
    clock = Clock(NOON)
    stage = Budget(store, StaticRules([BudgetRule(name="short-run", duration_s=30)]), clock=clock)
    forwarded: list[Call] = []
    await stage(call(run="timed"), forwarding(forwarded))
    clock.now = NOON + 29
    await stage(call(run="timed"), forwarding(forwarded))
    clock.now = NOON + 31
    with pytest.raises(BudgetExceeded, match="duration 31s of 30s"):
        await stage(call(run="timed"), forwarding(forwarded))
    await stage(call(run="another"), forwarding(forwarded))
    assert len(forwarded) == 3


async def test_one_budget_full_means_no_other_budget_is_charged(store: BudgetStore) -> None:
    rules = [BudgetRule(name="a-wide", calls=100), BudgetRule(name="b-narrow", calls=1)]
    stage = Budget(store, StaticRules(rules))
    forwarded: list[Call] = []
    await stage(call(), forwarding(forwarded))
    for _ in range(3):
        with pytest.raises(BudgetExceeded, match="b-narrow"):
            await stage(call(), forwarding(forwarded))
    lines = await effective_budgets(rules, store, ALICE, "run-1", NOON)
    assert {line["budget"]: line["used"] for line in lines} == {"a-wide": 1, "b-narrow": 1}


async def test_an_unreachable_redis_refuses_the_call() -> None:
    store = RedisBudgetStore("redis://127.0.0.1:1/0", "agentgw-test:")
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=10)]))
    forwarded: list[Call] = []
    with pytest.raises(Unavailable, match="budget store unavailable"):
        await stage(call(), forwarding(forwarded))
    assert forwarded == []
    await store.aclose()


async def test_an_unwritable_database_refuses_the_call(tmp_path: Path) -> None:
    path = tmp_path / "budgets.db"
    SqlBudgetStore(make_engine(f"sqlite:///{path}"))  # creates the table
    store = SqlBudgetStore(make_engine(f"sqlite:///file:{path}?mode=ro&uri=true"))
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=10)]))
    forwarded: list[Call] = []
    with pytest.raises(Unavailable):
        await stage(call(), forwarding(forwarded))
    assert forwarded == []


async def test_a_local_ledger_that_cannot_save_its_counters_refuses_the_call(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'budgets.db'}")
    clock = Clock(0.0)
    store = LocalBudgetStore(engine, flush_s=3600, clock=clock)  # the test flushes, not the thread
    stage = Budget(store, StaticRules([BudgetRule(name="run", calls=10)]))
    forwarded: list[Call] = []
    await stage(call(), forwarding(forwarded))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE budget_counter")
    assert not await asyncio.to_thread(store.flush)
    clock.now += FAIL_AFTER_FLUSHES * 3600 + 1
    with pytest.raises(Unavailable, match="budget store unavailable"):
        await stage(call(), forwarding(forwarded))
    assert len(forwarded) == 1
    await store.aclose()
