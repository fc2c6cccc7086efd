"""Legacy-era MCP session bindings: session id -> (endpoint, upstream session id, owner).

Every 2025-11-25-era session (`Mcp-Session-Id`) the gateway serves is bound here to the principal
that created it, whichever path serves it: the pass-through mints its own ids in place of the
upstream's; the bridge binds the ids its SDK server minted, with the URL of the node that holds the
SDK session in place of an upstream id when nodes share bindings (forwarding.py). One caller can
never ride, listen on or end another caller's session: a foreign id answers exactly as an unknown one
(404).

Bindings are bounded: at most `SessionLimits.per_principal` open sessions per principal and
`SessionLimits.total` in all; one unused for `SessionLimits.idle_s` expires. In memory for one
process; in Redis when gateway nodes share sessions (any node checks a session another node bound,
and the caps count every node's sessions).
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from redis.exceptions import RedisError

from agentgw.errors import GatewayError, SessionNotFound, SessionsExhausted, TooManySessions, Unavailable
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = ["MemorySessionStore", "RedisSessionStore", "SessionLimits", "SessionStore"]

# Longer ids were never minted by anyone: refuse them before they reach a store.
MAX_SESSION_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """How many legacy sessions may be open, and how long an unused one lives."""

    per_principal: int = 100
    total: int = 10_000
    idle_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Binding:
    server: str
    upstream_id: str
    subject: str


class SessionStore(Protocol):
    async def bind(
        self, server: str, upstream_id: str, subject: str, *, session_id: str | None = None
    ) -> str: ...

    async def resolve(self, session_id: str, server: str, subject: str) -> str: ...

    async def drop(self, session_id: str, subject: str) -> None: ...


def _check(binding: Binding | None, server: str, subject: str) -> str:
    # Unknown, expired, another server's, or another principal's: indistinguishable to the caller.
    if binding is None or binding.server != server or binding.subject != subject:
        raise _unknown()
    return binding.upstream_id


def _unknown() -> SessionNotFound:
    return SessionNotFound("session not found: start a new session with initialize")


def _over_principal_cap(limit: int) -> TooManySessions:
    return TooManySessions(
        f"too many open sessions: a caller may hold {limit}; end one (HTTP DELETE) or let one expire"
    )


def _over_total_cap() -> SessionsExhausted:
    return SessionsExhausted("the gateway holds as many sessions as it may: try again later")


@dataclass(slots=True)
class _Entry:
    binding: Binding
    used: float


class MemorySessionStore:
    """Bindings of one process, least recently used first, so expired ones are found at the front."""

    def __init__(
        self, limits: SessionLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits or SessionLimits()
        self._clock = clock
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()
        self._owned: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def _forget(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id, None)
        if entry is not None:
            subject = entry.binding.subject
            self._owned[subject] -= 1
            if self._owned[subject] <= 0:
                del self._owned[subject]

    def _expire(self, now: float) -> None:
        while self._sessions:
            session_id, entry = next(iter(self._sessions.items()))
            if now - entry.used < self._limits.idle_s:
                return
            self._forget(session_id)

    async def bind(
        self, server: str, upstream_id: str, subject: str, *, session_id: str | None = None
    ) -> str:
        """Bind a new session to `subject`; its id is `session_id`, or a fresh one.

        Raises:
            TooManySessions: `subject` already holds as many sessions as it may.
            SessionsExhausted: the process holds as many sessions as it may.
        """
        now = self._clock()
        self._expire(now)
        if self._owned[subject] >= self._limits.per_principal:
            raise _over_principal_cap(self._limits.per_principal)
        if len(self._sessions) >= self._limits.total:
            raise _over_total_cap()
        session_id = session_id or secrets.token_urlsafe(24)
        if session_id in self._sessions:
            raise GatewayError("session id already bound")
        self._sessions[session_id] = _Entry(Binding(server, upstream_id, subject), now)
        self._owned[subject] += 1
        return session_id

    async def resolve(self, session_id: str, server: str, subject: str) -> str:
        """The upstream session id behind `session_id`; each use by its owner extends its life.

        Raises:
            SessionNotFound: unknown, expired, for another server, or owned by another principal.
        """
        entry = self._sessions.get(session_id)
        now = self._clock()
        if entry is not None and now - entry.used >= self._limits.idle_s:
            self._forget(session_id)
            entry = None
        upstream_id = _check(entry.binding if entry is not None else None, server, subject)
        assert entry is not None
        entry.used = now
        self._sessions.move_to_end(session_id)
        return upstream_id

    async def drop(self, session_id: str, subject: str) -> None:
        entry = self._sessions.get(session_id)
        if entry is not None and entry.binding.subject == subject:
            self._forget(session_id)


# Both scripts read the clock of Redis, which every node shares. Each principal's open sessions are a
# sorted set scored by expiry time; so are all sessions, for the total cap.
_BIND = """
local ttl = tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return 2 end
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl, 'NX') then return 3 end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], now + ttl, ARGV[3])
return 0
"""
# Only the owner's use extends a session's life (a stranger holding the id must not keep it alive).
_RESOLVE = """
local value = redis.call('GET', KEYS[1])
if not value or cjson.decode(value)['subject'] ~= ARGV[3] then return value end
local ttl = tonumber(ARGV[1])
local expires = tonumber(redis.call('TIME')[1]) + ttl
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], 'XX', expires, ARGV[2])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], 'XX', expires, ARGV[2])
return value
"""


class RedisSessionStore:
    """Bindings in Redis with a sliding TTL; an unreachable Redis refuses the call (fail closed)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentgw:mcp-session:",
        limits: SessionLimits | None = None,
        settings: RedisSettings | None = None,
    ) -> None:
        self._redis = redis_client(url, settings)
        self._prefix = prefix
        # Apart from the bindings' keys: no session id a client sends can name one of these.
        base = prefix.rstrip(":")
        self._owner_prefix = f"{base}-owner:"
        self._all = f"{base}-all"
        self._limits = limits or SessionLimits()
        self._ttl = max(1, round(self._limits.idle_s))
        self._bind = self._redis.register_script(_BIND)
        self._resolve = self._redis.register_script(_RESOLVE)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def bind(
        self, server: str, upstream_id: str, subject: str, *, session_id: str | None = None
    ) -> str:
        """Bind a new session to `subject`; its id is `session_id`, or a fresh one.

        Raises:
            TooManySessions: `subject` already holds as many sessions as it may, on all nodes together.
            SessionsExhausted: the nodes hold as many sessions as they may.
            Unavailable: Redis is unreachable.
        """
        session_id = session_id or secrets.token_urlsafe(24)
        value = orjson.dumps({"server": server, "upstream": upstream_id, "subject": subject})
        keys = [self._prefix + session_id, self._owner_prefix + subject, self._all]
        args: list[bytes | str | int] = [
            value,
            self._ttl,
            session_id,
            self._limits.per_principal,
            self._limits.total,
        ]
        try:
            outcome = await self._bind(keys=keys, args=args)
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
        if outcome == 1:
            raise _over_principal_cap(self._limits.per_principal)
        if outcome == 2:
            raise _over_total_cap()
        if outcome != 0:
            raise GatewayError("session id already bound")
        return session_id

    async def resolve(self, session_id: str, server: str, subject: str) -> str:
        """The upstream session id behind `session_id`; each use by its owner extends its life.

        Raises:
            SessionNotFound: unknown, expired, for another server, or owned by another principal.
            Unavailable: Redis is unreachable.
        """
        if len(session_id) > MAX_SESSION_ID_CHARS:
            raise _unknown()
        keys = [self._prefix + session_id, self._owner_prefix + subject, self._all]
        try:
            raw = await self._resolve(keys=keys, args=[self._ttl, session_id, subject])
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
        binding = None
        if raw is not None:
            data = orjson.loads(raw)
            binding = Binding(data["server"], data["upstream"], data["subject"])
        return _check(binding, server, subject)

    async def drop(self, session_id: str, subject: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._prefix + session_id)
                pipe.zrem(self._owner_prefix + subject, session_id)
                pipe.zrem(self._all, session_id)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("the session store is unreachable") from exc
