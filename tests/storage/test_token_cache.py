"""Upstream tokens in the machine's Redis: sealed under the operator's secret and bound to their entry,
never longer-lived than they say, deleted only while they hold the refused token."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from agentgw.records.credentials import SharedToken, token_digest
from agentgw.settings import load_settings
from agentgw.storage.token_cache import RedisTokenStore
from tests.support.proxy import TcpProxy

REDIS = "redis://127.0.0.1:6379/0"
SECRET = "s" * 32


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"agentgw:test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.asyncio.Redis.from_url(REDIS)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


def token(authorization: str = "Bearer t1", life_s: float = 60) -> SharedToken:
    return SharedToken(authorization, "authorization", ("client:gw",), time.time() + life_s)


async def test_a_token_opens_only_under_its_own_name_and_the_same_secret(prefix: str) -> None:
    store = RedisTokenStore(REDIS, SECRET, prefix=prefix)
    other_secret = RedisTokenStore(REDIS, "o" * 32, prefix=prefix)
    raw = redis.asyncio.Redis.from_url(REDIS)
    try:
        await store.put("alice", token())
        found = await store.get("alice")
        assert found is not None and found.authorization == "Bearer t1" and found.actors == ("client:gw",)
        sealed = await raw.get(f"{prefix}alice")
        assert sealed is not None and b"t1" not in sealed and b"client:gw" not in sealed
        assert await other_secret.get("alice") is None
        await raw.set(f"{prefix}bob", sealed)
        assert await store.get("bob") is None
    finally:
        await raw.aclose()
        await store.aclose()
        await other_secret.aclose()


async def test_an_entry_lives_no_longer_than_its_token_nor_its_redis_expiry(prefix: str) -> None:
    store = RedisTokenStore(REDIS, SECRET, prefix=prefix)
    raw = redis.asyncio.Redis.from_url(REDIS)
    try:
        await store.put("short", token(life_s=60))
        assert 0 < await raw.pttl(f"{prefix}short") <= 60_000
        await raw.pexpire(f"{prefix}short", 5_000)
        found = await store.get("short")
        assert found is not None and found.expires_at <= time.time() + 5
        await store.put("gone", token(life_s=-1))
        assert await raw.exists(f"{prefix}gone") == 0
    finally:
        await raw.aclose()
        await store.aclose()


async def test_discard_deletes_the_refused_token_but_keeps_a_newer_one(prefix: str) -> None:
    store = RedisTokenStore(REDIS, SECRET, prefix=prefix)
    try:
        await store.put("k", token("Bearer new"))
        await store.discard("k", "Bearer old")
        assert (found := await store.get("k")) is not None and found.authorization == "Bearer new"
        await store.discard("k", "Bearer new")
        assert await store.get("k") is None
    finally:
        await store.aclose()


async def test_a_discard_reaches_every_watching_node_and_a_broken_watch_says_so(
    prefix: str, redis_proxy: TcpProxy
) -> None:
    node = RedisTokenStore(REDIS, SECRET, prefix=prefix)
    other = RedisTokenStore(f"redis://127.0.0.1:{redis_proxy.port}/0", SECRET, prefix=prefix)
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    lost = asyncio.Event()
    watching = asyncio.create_task(
        other.watch(lambda name, digest: heard.put_nowait((name, digest)), lost.set)
    )
    try:
        got = None
        for _ in range(100):  # until the watch has subscribed: what is published before is not heard
            await node.discard("k", "Bearer refused")
            with contextlib.suppress(TimeoutError):
                got = await asyncio.wait_for(heard.get(), 0.05)
                break
        assert got == ("k", token_digest("Bearer refused"))
        redis_proxy.cut()
        await asyncio.wait_for(lost.wait(), 5)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await node.aclose()
        await other.aclose()


def test_a_short_secret_and_an_undeclared_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        RedisTokenStore(REDIS, "short")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"data_dir: {tmp_path}\ntoken_cache: {{secret: nowhere}}\n")
    with pytest.raises(ValueError, match="no secret 'nowhere' is declared"):
        load_settings(config)
