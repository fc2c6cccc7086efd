"""Readiness: stores probed at most once per TTL, each failure with its reason; upstreams reported as
last seen, never probed."""

from __future__ import annotations

import anyio

from agentgw.errors import Unavailable
from agentgw.health import Readiness


class Store:
    def __init__(self) -> None:
        self.probes = 0
        self.failure: Exception | None = None
        self.stall = False

    async def __call__(self) -> None:
        self.probes += 1
        if self.stall:
            await anyio.sleep_forever()
        if self.failure is not None:
            raise self.failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_ready_only_while_every_store_answers_and_probes_are_cached_for_the_ttl() -> None:
    budget, audit, clock = Store(), Store(), Clock()
    upstreams = {"upstream 'a'": {"ok": False, "reason": "unreachable"}}
    readiness = Readiness(
        {"budget_store": budget, "audit_log": audit}, lambda: upstreams, ttl_s=2, timeout_s=0.2, clock=clock
    )
    ready, body = await readiness.report()
    assert ready and body["status"] == "ready", "a failing upstream does not make the gateway unready"
    assert body["upstreams"] == upstreams
    budget.failure = ConnectionRefusedError("redis at 10.0.0.7:6379 with password hunter2")
    audit.failure = Unavailable("audit log unavailable: the database does not take records")
    assert (await readiness.report())[0], "within the TTL the last round of probes answers"
    assert (budget.probes, audit.probes) == (1, 1)
    clock.now += 2
    ready, body = await readiness.report()
    assert not ready and body["status"] == "not_ready"
    assert body["stores"] == {
        "budget_store": {
            "ok": False,
            "reason": "ConnectionRefusedError",
        },  # a driver's words may hold secrets
        "audit_log": {"ok": False, "reason": "audit log unavailable: the database does not take records"},
    }
    budget.failure = audit.failure = None
    budget.stall = True
    clock.now += 2
    with anyio.fail_after(5):
        ready, body = await readiness.report()
    assert not ready and body["stores"]["budget_store"] == {"ok": False, "reason": "no answer within 0.2s"}


async def test_concurrent_requests_share_one_round_of_probes() -> None:
    store = Store()
    readiness = Readiness({"policy": store}, dict, ttl_s=60)
    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(readiness.report)
    assert store.probes == 1
