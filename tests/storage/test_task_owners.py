"""A2A task ownership in the machine's Redis: claimed once, never handed over, fail closed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from agentgw.errors import Unavailable
from agentgw.storage.task_owners import RedisTaskOwners
from tests.support.proxy import TcpProxy

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def owners() -> AsyncIterator[RedisTaskOwners]:
    store = RedisTaskOwners(REDIS, prefix=f"agentgw:test:{uuid.uuid4().hex}:")
    yield store
    await store.aclose()


async def test_the_first_claim_owns_the_task_on_every_node(owners: RedisTaskOwners) -> None:
    other_node = RedisTaskOwners(REDIS, prefix=owners._prefix)
    try:
        assert await owners.claim("agent", "t1", "user:alice")
        assert await other_node.owner("agent", "t1") == "user:alice"
        assert not await other_node.claim("agent", "t1", "user:mallory")
        assert await other_node.claim("agent", "t1", "user:alice")
        assert await owners.owner("agent", "t1") == "user:alice"
    finally:
        await other_node.aclose()


async def test_tasks_of_two_agents_and_odd_ids_do_not_collide(owners: RedisTaskOwners) -> None:
    # Agent names are registry names (no space); task ids are the agent's choice, anything.
    assert await owners.claim("a", "b c\n\u00e9", "user:alice")
    assert await owners.claim("a-b", "c\n\u00e9", "user:bob")
    assert await owners.claim("a", "t", "user:carol")
    assert await owners.claim("b", "t", "user:dave")
    assert await owners.owner("a", "b c\n\u00e9") == "user:alice"
    assert await owners.owner("a-b", "c\n\u00e9") == "user:bob"
    assert (await owners.owner("a", "t"), await owners.owner("b", "t")) == ("user:carol", "user:dave")
    assert await owners.owner("a", "unknown") is None


async def test_an_unreachable_store_refuses() -> None:
    with TcpProxy(6379) as proxy:
        store = RedisTaskOwners(
            f"redis://127.0.0.1:{proxy.port}/0", prefix=f"agentgw:test:{uuid.uuid4().hex}:"
        )
        try:
            assert await store.claim("agent", "t", "user:alice")
            proxy.refuse()
            with pytest.raises(Unavailable):
                await store.owner("agent", "t")
            with pytest.raises(Unavailable):
                await store.claim("agent", "t2", "user:alice")
        finally:
            await store.aclose()
