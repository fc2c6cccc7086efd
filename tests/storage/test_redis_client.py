"""The Redis clients (budget counters, MCP session bindings): many concurrent calls wait for a
connection instead of being refused; a hung Redis refuses calls within the socket timeout; lost
connections are replaced; all without a restart.

Faults go through a proxy in front of the machine's Redis (`tests/support/proxy.py`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from agentgw.errors import Unavailable
from agentgw.ingress.mcp.sessions import RedisSessionStore, SessionLimits
from agentgw.storage.budget.redis import RedisBudgetStore
from agentgw.storage.redis_client import RedisSettings
from tests.storage.budget.test_stores import NOW, REDIS, charge
from tests.support.proxy import TcpProxy

# The default socket timeout, and how long past it a refusal may take on a slow, shared machine.
SOCKET_TIMEOUT_S = RedisSettings().socket_timeout_s
SLACK_S = 2.0


def prefix() -> str:
    return f"agentgw-test:{uuid.uuid4().hex}:"


@dataclass
class Stores:
    """Both Redis stores of a gateway process, with their default settings."""

    budget: RedisBudgetStore
    sessions: RedisSessionStore
    counter: str

    async def reserve(self) -> None:
        assert await self.budget.reserve([charge(self.counter, 1_000_000)], NOW) is None

    async def bind(self) -> None:
        session = await self.sessions.bind("github", "upstream-1", "user:alice")
        assert await self.sessions.resolve(session, "github", "user:alice") == "upstream-1"

    async def both(self) -> list[object]:
        return await asyncio.gather(self.reserve(), self.bind(), return_exceptions=True)


async def open_stores(url: str) -> AsyncIterator[Stores]:
    keys = prefix()
    built = Stores(
        RedisBudgetStore(url, keys + "budget:"),
        RedisSessionStore(
            url, prefix=keys + "session:", limits=SessionLimits(per_principal=10_000, idle_s=60)
        ),
        f"k-{uuid.uuid4().hex}",
    )
    yield built
    await built.budget.aclose()
    await built.sessions.aclose()


@pytest.fixture
async def stores() -> AsyncIterator[Stores]:
    async for built in open_stores(REDIS):
        yield built


@pytest.fixture
async def proxied(redis_proxy: TcpProxy) -> AsyncIterator[Stores]:
    async for built in open_stores(f"redis://127.0.0.1:{redis_proxy.port}/0"):
        assert await built.both() == [None, None]
        yield built
        redis_proxy.resume()


async def attempts_until_both_work(stores: Stores, most: int) -> int:
    for attempt in range(1, most + 1):
        if await stores.both() == [None, None]:
            return attempt
    pytest.fail(f"the stores still refuse after {most} attempts")


async def test_three_hundred_concurrent_calls_per_store_are_all_served(stores: Stores) -> None:
    outcomes = await asyncio.gather(
        *(stores.reserve() for _ in range(300)), *(stores.bind() for _ in range(300)), return_exceptions=True
    )
    assert [o for o in outcomes if o is not None] == []
    assert await stores.budget.used([stores.counter], NOW) == {stores.counter: 300}


async def test_calls_beyond_max_connections_wait_for_one_and_no_more_are_opened(
    redis_proxy: TcpProxy,
) -> None:
    store = RedisBudgetStore(
        f"redis://127.0.0.1:{redis_proxy.port}/0", prefix(), RedisSettings(max_connections=4)
    )
    counter = f"k-{uuid.uuid4().hex}"
    try:
        outcomes = await asyncio.gather(
            *(store.reserve([charge(counter, 1000)], NOW) for _ in range(100)), return_exceptions=True
        )
        assert outcomes == [None] * 100
        assert redis_proxy.accepted <= 4
    finally:
        await store.aclose()


async def test_connections_that_fail_to_open_do_not_widen_the_pool(redis_proxy: TcpProxy) -> None:
    url = f"redis://127.0.0.1:{redis_proxy.port}/0"
    store = RedisBudgetStore(url, prefix(), RedisSettings(max_connections=4))
    charges = [charge(f"k-{uuid.uuid4().hex}", 1000)]
    try:
        redis_proxy.refuse()
        refused = await asyncio.gather(
            *(store.reserve(charges, NOW) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in refused)
        redis_proxy.resume()
        before = redis_proxy.accepted
        outcomes = await asyncio.gather(
            *(store.reserve(charges, NOW) for _ in range(100)), return_exceptions=True
        )
        assert outcomes == [None] * 100
        assert redis_proxy.accepted - before <= 4
    finally:
        await store.aclose()


async def test_under_sustained_load_waiting_calls_are_served_first_come_first_served() -> None:
    """Workers calling back to back, ten times as many as connections: a waiting call is served in
    its turn, not overtaken until its wait runs out."""
    settings = RedisSettings(max_connections=4, pool_timeout_s=0.5)
    store = RedisBudgetStore(REDIS, prefix(), settings)
    charges = [charge(f"k-{uuid.uuid4().hex}", 10**9)]
    refused: list[Exception] = []
    until = time.monotonic() + 3.0

    async def worker() -> None:
        while time.monotonic() < until:
            try:
                await store.reserve(charges, NOW)
            except Unavailable as exc:
                refused.append(exc)

    try:
        await asyncio.gather(*(worker() for _ in range(40)))
    finally:
        await store.aclose()
    assert refused == []


async def test_while_redis_hangs_calls_are_refused_within_the_socket_timeout(
    proxied: Stores, redis_proxy: TcpProxy
) -> None:
    redis_proxy.pause()
    started = time.monotonic()
    outcomes = await redis_proxy.answer_within(
        asyncio.gather(*(proxied.both() for _ in range(10))), SOCKET_TIMEOUT_S + SLACK_S
    )
    assert isinstance(outcomes, list)
    assert all(isinstance(o, Unavailable) for pair in outcomes for o in pair), outcomes
    assert time.monotonic() - started < SOCKET_TIMEOUT_S + SLACK_S

    redis_proxy.resume()
    assert await attempts_until_both_work(proxied, most=3) == 1


async def test_after_lost_connections_and_a_refusing_redis_the_stores_work_again(
    proxied: Stores, redis_proxy: TcpProxy
) -> None:
    redis_proxy.cut()
    assert await attempts_until_both_work(proxied, most=3) <= 2

    redis_proxy.refuse()
    refused = await redis_proxy.answer_within(proxied.both(), SLACK_S)
    assert isinstance(refused, list) and all(isinstance(o, Unavailable) for o in refused), refused
    redis_proxy.resume()
    assert await attempts_until_both_work(proxied, most=3) <= 2
