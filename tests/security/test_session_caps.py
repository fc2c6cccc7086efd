"""The session bindings are bounded: per principal, in total, and in time (an unused binding expires,
in memory as in Redis, and frees its place)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from agentgw.errors import SessionNotFound, SessionsExhausted, TooManySessions
from agentgw.ingress.mcp.sessions import MemorySessionStore, RedisSessionStore, SessionLimits

REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_unused_binding_expires_and_frees_its_place() -> None:
    clock = Clock()
    store = MemorySessionStore(SessionLimits(per_principal=1, total=10, idle_s=60), clock=clock)
    session = await store.bind("s", "up-1", "alice")
    with pytest.raises(TooManySessions):
        await store.bind("s", "up-2", "alice")
    clock.now += 59
    assert await store.resolve(session, "s", "alice") == "up-1"  # each use by its owner extends it
    clock.now += 59
    with pytest.raises(SessionNotFound):
        await store.resolve(session, "s", "mallory")  # a stranger's try does not
    clock.now += 2
    with pytest.raises(SessionNotFound):
        await store.resolve(session, "s", "alice")
    assert await store.bind("s", "up-2", "alice")


async def test_expired_bindings_of_anyone_are_forgotten_without_being_asked_for() -> None:
    clock = Clock()
    store = MemorySessionStore(SessionLimits(per_principal=1, total=100, idle_s=60), clock=clock)
    for i in range(100):
        await store.bind("s", f"up-{i}", f"user-{i}")
    with pytest.raises(SessionsExhausted):
        await store.bind("s", "up", "another")
    clock.now += 61
    await store.bind("s", "up", "another")
    assert len(store) == 1


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"agentgw-test:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.from_url(REDIS)
    async for key in client.scan_iter(match=prefix.rstrip(":") + "*"):
        await client.delete(key)
    await client.aclose()


async def test_redis_bindings_are_capped_across_nodes_and_expire(redis_prefix: str) -> None:
    limits = SessionLimits(per_principal=2, total=3, idle_s=120)
    node_a = RedisSessionStore(REDIS, prefix=redis_prefix, limits=limits)
    node_b = RedisSessionStore(REDIS, prefix=redis_prefix, limits=limits)
    try:
        first = await node_a.bind("s", "up-1", "alice")
        await node_b.bind("s", "up-2", "alice")
        with pytest.raises(TooManySessions):
            await node_a.bind("s", "up-3", "alice")
        await node_b.bind("s", "up-4", "bob")
        with pytest.raises(SessionsExhausted):
            await node_a.bind("s", "up-5", "carol")
        # Ending one on another node frees its place on every node.
        assert await node_b.resolve(first, "s", "alice") == "up-1"
        await node_b.drop(first, "alice")
        with pytest.raises(SessionNotFound):
            await node_a.resolve(first, "s", "alice")
        again = await node_a.bind("s", "up-6", "alice")
        ttl = await node_a._redis.ttl(redis_prefix + again)
        assert 0 < ttl <= 120
    finally:
        await node_a.aclose()
        await node_b.aclose()
