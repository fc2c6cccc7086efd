"""Budget counters in Redis, shared by every gateway node.

Each operation is one Lua script, so a reservation checks every counter and then adds to every
counter with nothing in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentgw.errors import Unavailable
from agentgw.records.budget import Charge, Shortfall
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = ["RedisBudgetStore"]


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

    def __init__(self, url: str, prefix: str, settings: RedisSettings | None = None) -> None:
        self._redis = redis_client(url, settings)
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
