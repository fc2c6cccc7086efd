"""A2A task ownership in Redis, shared by every gateway node.

The A2A ingress remembers which principal created each task, so that only its creator can read,
follow or cancel it. In one process that is memory; across nodes behind a load balancer, a task
created through one node is followed up through another, so the owner lives in Redis. A key is
claimed once (`SET NX`) and never changes hands; it lives as long as the agent may keep the task.
An unreachable Redis refuses the call (fail closed): no node may guess whose a task is.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from agentgw.errors import Unavailable
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = ["RedisTaskOwners"]

# A task nobody touched for this long is forgotten: it reads as not found, as after a restart.
DEFAULT_TTL_S = 7 * 24 * 3600


class RedisTaskOwners:
    """`TaskOwners` (the A2A ingress's port) in Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentgw:a2a-task:",
        ttl_s: int = DEFAULT_TTL_S,
        settings: RedisSettings | None = None,
    ) -> None:
        self._redis = redis_client(url, settings)
        self._prefix = prefix
        self._ttl = ttl_s

    def _key(self, agent: str, task_id: str) -> str:
        # The agent name cannot hold a space; the task id (the agent's choice) comes last, whole.
        return f"{self._prefix}{agent} {task_id}"

    async def claim(self, agent: str, task_id: str, subject: str) -> bool:
        """Record `subject` as the owner unless someone else is; True if `subject` owns it now.

        Raises:
            Unavailable: Redis is unreachable.
        """
        key = self._key(agent, task_id)
        try:
            if await self._redis.set(key, subject, nx=True, ex=self._ttl):
                return True
            current = await self._redis.get(key)
            if current is not None and _text(current) == subject:
                await self._redis.expire(key, self._ttl)
                return True
        except RedisError as exc:
            raise Unavailable("the task store is unreachable") from exc
        return False

    async def owner(self, agent: str, task_id: str) -> str | None:
        """The subject that created the task, or None if nobody did (or it was forgotten).

        Raises:
            Unavailable: Redis is unreachable.
        """
        try:
            current = await self._redis.get(self._key(agent, task_id))
        except RedisError as exc:
            raise Unavailable("the task store is unreachable") from exc
        return None if current is None else _text(current)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()
