"""Budget counters behind the `BudgetStore` protocol: SQL (SQLite or PostgreSQL) and Redis.

Both reserve all of a call's charges or none, atomically across processes:
- SQL: one transaction of conditional `UPDATE ... SET used = used + n WHERE used + n <= limit`
  statements, taken in key order so that two transactions never wait on each other in a cycle.
  PostgreSQL re-checks the condition on the row a concurrent winner left; SQLite has one writer.
- Redis: one Lua script checks every counter, then adds to every counter.
A counter expires with its window (or, for runs, `run_ttl_s` after the run's first call); an
expired counter starts again from zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
from sqlalchemy import BigInteger, Connection, Engine, Float, String, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, SQLModel

from agentgw.errors import Unavailable
from agentgw.filters.budget import BudgetSettings, BudgetStore, Charge, Shortfall
from agentgw.settings import ConfigError

__all__ = ["BudgetCounter", "RedisBudgetStore", "SqlBudgetStore", "budget_store"]

# Expired counters are deleted at most this often, by whichever reservation comes along.
PRUNE_EVERY_S = 300.0


class BudgetCounter(SQLModel, table=True):
    __tablename__ = "budget_counter"

    key: str = Field(primary_key=True, sa_type=String(512))
    used: int = Field(default=0, sa_type=BigInteger)
    expires_at: float = Field(index=True, sa_type=Float)


_T = BudgetCounter.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped


MAX_ENSURED = 100_000


class SqlBudgetStore:
    """Counters in the gateway's SQL database (the embedded default)."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"budget counters need SQLite or PostgreSQL, not {dialect}")
        self._engine = engine
        self._insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        # SQLite has one writer per database anyway; queueing in-process avoids busy-waiting on it.
        self._lock: threading.Lock | None = threading.Lock() if dialect == "sqlite" else None
        self._pruned_at = 0.0
        # Counters this process has ensured, with their expiry as stored: a live one needs no upsert
        # per call. Only a shortcut: a counter that vanished since is re-created on the spot.
        self._ensured: dict[str, float] = {}
        SQLModel.metadata.create_all(engine, tables=[_T])

    def _ensure(self, conn: Connection, key: str, initial: int, expires_at: float, now: float) -> None:
        # Create the counter, or start an expired one afresh; a live one is left alone.
        stmt = self._insert(_T).values(key=key, used=initial, expires_at=expires_at)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[_T.c.key],
                set_={"used": stmt.excluded.used, "expires_at": stmt.excluded.expires_at},
                where=_T.c.expires_at <= now,
            )
        )

    def _run(self, work: Any) -> Any:
        try:
            if self._lock is None:
                return work()
            with self._lock:
                return work()
        except SQLAlchemyError as exc:
            raise Unavailable("budget store unavailable: the call was not forwarded") from exc

    def _reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        ensured: dict[str, float] = {}
        with self._engine.connect() as conn:
            for index in sorted(range(len(charges)), key=lambda i: charges[i].key):
                charge = charges[index]
                if self._ensured.get(charge.key, 0.0) <= now:
                    self._ensure(conn, charge.key, 0, charge.expires_at, now)
                    stored = conn.execute(select(_T.c.expires_at).where(_T.c.key == charge.key)).scalar_one()
                    ensured[charge.key] = float(stored)
                result = conn.execute(
                    update(_T)
                    .where(
                        _T.c.key == charge.key,
                        _T.c.used + charge.amount <= charge.limit,
                        _T.c.used < charge.limit,
                    )
                    .values(used=_T.c.used + charge.amount)
                )
                if result.rowcount == 0:
                    used = conn.execute(select(_T.c.used).where(_T.c.key == charge.key)).scalar_one_or_none()
                    conn.rollback()
                    if used is None:  # pruned by another process since this one ensured it: again, afresh
                        self._ensured.clear()
                        return self._reserve(charges, now)
                    return Shortfall(index, int(used))
            if now - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = now
                conn.execute(delete(_T).where(_T.c.expires_at < now))
                self._ensured = {k: e for k, e in self._ensured.items() if e > now}
            conn.commit()
        # Only once committed: before that, another connection may not see the row yet.
        if len(self._ensured) > MAX_ENSURED:
            self._ensured.clear()
        self._ensured.update(ensured)
        return None

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        """Take every charge, or none.

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        result: Shortfall | None = await anyio.to_thread.run_sync(
            lambda: self._run(lambda: self._reserve(charges, now))
        )
        return result

    def _adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        with self._engine.connect() as conn:
            for key, delta in sorted(deltas):
                conn.execute(update(_T).where(_T.c.key == key).values(used=_T.c.used + delta))
            conn.commit()

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add `delta` to each counter that still exists.

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        await anyio.to_thread.run_sync(lambda: self._run(lambda: self._adjust(deltas)))

    def _started(self, key: str, now: float, expires_at: float) -> float:
        with self._engine.connect() as conn:
            self._ensure(conn, key, int(now * 1000), expires_at, now)
            value = conn.execute(select(_T.c.used).where(_T.c.key == key)).scalar_one()
            conn.commit()
        return int(value) / 1000

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """The first `now` recorded under `key` (millisecond precision).

        Raises:
            Unavailable: the database cannot be reached or written.
        """
        result: float = await anyio.to_thread.run_sync(
            lambda: self._run(lambda: self._started(key, now, expires_at))
        )
        return result

    def _used(self, keys: Sequence[str], now: float) -> dict[str, int]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_T.c.key, _T.c.used).where(_T.c.key.in_(list(keys)), _T.c.expires_at > now)
            ).all()
        return {str(k): int(v) for k, v in rows}

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]:
        """Current values of the live counters among `keys` (absent: nothing used yet).

        Raises:
            Unavailable: the database cannot be reached.
        """
        at = time.time() if now is None else now
        result: dict[str, int] = await anyio.to_thread.run_sync(
            lambda: self._run(lambda: self._used(keys, at))
        )
        return result

    async def aclose(self) -> None:
        return None


# KEYS: the counters; ARGV: amount, limit, ttl in ms for each. Returns {index, used} of the first
# charge that does not fit (0-based), or {-1, 0} once every counter has been added to.
_RESERVE = """
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  if used + amount > limit or used >= limit then
    return {i - 1, used}
  end
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
  else
    redis.call('SET', KEYS[i], ARGV[3 * i - 2], 'PX', ARGV[3 * i])
  end
end
return {-1, 0}
"""
# A counter that has expired stays gone: a late settle must not resurrect it without a TTL.
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[i])
  end
end
return 0
"""
_STARTED = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
"""


class RedisBudgetStore:
    """Counters in Redis, shared by every gateway node; each operation is one Lua script."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url)
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._adjust = self._redis.register_script(_ADJUST)
        self._started = self._redis.register_script(_STARTED)

    def _keys(self, keys: Sequence[str]) -> list[str]:
        return [self._prefix + k for k in keys]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable("budget store unavailable: the call was not forwarded") from exc

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None:
        """Take every charge, or none.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        args: list[Any] = []
        for charge in charges:
            ttl_ms = max(1, int((charge.expires_at - now) * 1000))
            args.extend((charge.amount, charge.limit, ttl_ms))
        index, used = await self._call(self._reserve, self._keys([c.key for c in charges]), args)
        if int(index) < 0:
            return None
        return Shortfall(int(index), int(used))

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add `delta` to each counter that still exists.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        if deltas:
            await self._call(self._adjust, self._keys([k for k, _ in deltas]), [d for _, d in deltas])

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """The first `now` recorded under `key` (millisecond precision).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        ttl_ms = max(1, int((expires_at - now) * 1000))
        value = await self._call(self._started, self._keys([key]), [int(now * 1000), ttl_ms])
        return int(value) / 1000

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]:
        """Current values of the live counters among `keys`.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        from redis.exceptions import RedisError

        if not keys:
            return {}
        try:
            values = await self._redis.mget(self._keys(keys))
        except (RedisError, OSError) as exc:
            raise Unavailable("budget store unavailable") from exc
        return {k: int(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def aclose(self) -> None:
        await self._redis.aclose()


def budget_store(
    settings: BudgetSettings, engine: Engine, shared_redis_url: str | None = None
) -> BudgetStore:
    """The store `settings.store` names; Redis at `budgets.redis_url`, else the gateway's `redis_url`.

    Raises:
        ConfigError: the Redis store is chosen but no Redis URL is set.
    """
    if settings.store == "redis":
        url = settings.redis_url or shared_redis_url
        if not url:
            raise ConfigError("budgets.store is redis: set budgets.redis_url or redis_url")
        return RedisBudgetStore(url, settings.redis_prefix)
    return SqlBudgetStore(engine)
