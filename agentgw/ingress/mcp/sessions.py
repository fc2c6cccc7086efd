"""Pass-through session bindings: gateway session id -> (server, upstream session id, owner).

Clients never see an upstream's session id; they get a gateway-minted one bound to the principal that
created it, so one caller cannot ride another caller's session. In memory for one process; in Redis
when gateway nodes share sessions (any node can continue a session another node started).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis.exceptions import RedisError

from agentgw.errors import SessionNotFound, Unavailable
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = ["MemorySessionStore", "RedisSessionStore", "SessionStore"]

SESSION_TTL_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class Binding:
    server: str
    upstream_id: str
    subject: str


class SessionStore(Protocol):
    async def bind(self, server: str, upstream_id: str, subject: str) -> str: ...

    async def resolve(self, session_id: str, server: str, subject: str) -> str: ...

    async def drop(self, session_id: str) -> None: ...


def _check(binding: Binding | None, server: str, subject: str) -> str:
    # Unknown, another server's, or another principal's: indistinguishable to the caller.
    if binding is None or binding.server != server or binding.subject != subject:
        raise SessionNotFound("session not found: start a new session with initialize")
    return binding.upstream_id


class MemorySessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Binding] = {}

    async def bind(self, server: str, upstream_id: str, subject: str) -> str:
        session_id = secrets.token_urlsafe(24)
        self._sessions[session_id] = Binding(server, upstream_id, subject)
        return session_id

    async def resolve(self, session_id: str, server: str, subject: str) -> str:
        """The upstream session id behind `session_id`.

        Raises:
            SessionNotFound: unknown, for another server, or owned by another principal.
        """
        return _check(self._sessions.get(session_id), server, subject)

    async def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class RedisSessionStore:
    """Bindings in Redis with a sliding TTL; an unreachable Redis refuses the call (fail closed)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentgw:mcp-session:",
        ttl_s: int = SESSION_TTL_S,
        settings: RedisSettings | None = None,
    ) -> None:
        self._redis = redis_client(url, settings)
        self._prefix = prefix
        self._ttl = ttl_s

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def bind(self, server: str, upstream_id: str, subject: str) -> str:
        session_id = secrets.token_urlsafe(24)
        value = orjson.dumps({"server": server, "upstream": upstream_id, "subject": subject})
        try:
            await self._redis.set(self._prefix + session_id, value, ex=self._ttl)
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
        return session_id

    async def resolve(self, session_id: str, server: str, subject: str) -> str:
        """The upstream session id behind `session_id`; each use extends its life.

        Raises:
            SessionNotFound: unknown, expired, for another server, or owned by another principal.
            Unavailable: Redis is unreachable.
        """
        try:
            raw = await self._redis.getex(self._prefix + session_id, ex=self._ttl)
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
        binding = None
        if raw is not None:
            data = orjson.loads(raw)
            binding = Binding(data["server"], data["upstream"], data["subject"])
        return _check(binding, server, subject)

    async def drop(self, session_id: str) -> None:
        try:
            await self._redis.delete(self._prefix + session_id)
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
