"""The gateway's Redis clients (budget counters, MCP session bindings): bounded, time-limited, no retries.

redis-py's own defaults suit neither a hot path nor fail-closed stores: its asyncio pool refuses a
command when its connections are all busy (instead of waiting for one), and a command is retried on a
timeout, so a hung Redis holds a call through several socket timeouts. Here each client's pool waits
up to `pool_timeout_s` for a free connection, first come first served, each command is refused after
`socket_timeout_s`, and no command is sent twice: a budget reservation is not idempotent, and a
refused call can be retried by its caller. A connection that Redis or the network closed is replaced
when it is next taken from the pool, so the client recovers by itself once Redis answers again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["RedisSettings", "redis_client"]


class RedisSettings(BaseModel):
    """Pool and time limits of each Redis client of a gateway process."""

    # Commands in flight at once per client; more wait for a free connection.
    max_connections: int = Field(default=100, ge=1)
    # How long a command waits for a free connection before its call is refused.
    pool_timeout_s: float = Field(default=2.0, gt=0)
    # How long a command waits for Redis's answer, and a connection for Redis to accept it.
    socket_timeout_s: float = Field(default=2.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)


class _FairPool(ConnectionPool):
    """A pool of at most `max_connections` where a command waits its turn, up to `timeout` seconds.

    Not redis-py's `BlockingConnectionPool`: its waiters wait on a condition that a newcomer overtakes
    whenever a connection comes back, so under sustained load an early waiter times out while later
    ones are served, and its bookkeeping costs a fifth of a command's client time. Here a semaphore,
    which hands a released turn to its longest waiter, admits commands; the pool under it never has
    to refuse one.
    """

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._turns = asyncio.Semaphore(self.max_connections)
        self._holding: set[AbstractConnection] = set()  # the connections that hold a turn

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if not self._turns.locked():
            await self._turns.acquire()  # at once: no timer for the common case
        else:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._turns.acquire()
            except TimeoutError as exc:
                raise RedisConnectionError("No connection available.") from exc
        try:
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]  # untyped in redis-py
        except BaseException:
            self._turns.release()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        # Also called by the pool itself for a connection that failed to connect: it holds no turn.
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._turns.release()


def redis_client(url: str, settings: RedisSettings | None = None) -> Redis:
    """A client of `url` with its own pool (closed with the client)."""
    limits = settings or RedisSettings()
    pool = _FairPool.from_url(
        url,
        max_connections=limits.max_connections,
        timeout=limits.pool_timeout_s,
        socket_timeout=limits.socket_timeout_s,
        socket_connect_timeout=limits.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)
