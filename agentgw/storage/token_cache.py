"""Exchanged upstream tokens in Redis, shared by every gateway node, encrypted at rest.

The credentials stage keeps tokens in memory; with this store behind its cache, a token one node
obtained serves every node until shortly before it expires, so N nodes exchange once per caller and
upstream instead of N times. Entries are named by a digest the stage derives from everything the
token depends on (docs/decisions/0605). Tokens are secrets: each value is sealed with AES-GCM under a
key derived from an operator's named secret, with the entry's name as associated data, so a value
moved to another name (another caller's) does not open there; one that does not open is ignored.

Redis is an optimisation here, not a store of record: every failure is `Unavailable`, and the stage
falls back to obtaining the token itself. Commands give up after `timeout_s`, well before the
Redis client's own limits, so a hung Redis costs a first call little.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from agentgw.errors import Unavailable
from agentgw.records.credentials import SharedToken, token_digest
from agentgw.storage.redis_client import RedisSettings, redis_client

__all__ = ["MIN_SECRET_CHARS", "RedisTokenStore", "TokenCacheSettings"]

log = logging.getLogger(__name__)

# The secret is the only key material: an operator's random string, not a password to guess.
MIN_SECRET_CHARS = 32
_NONCE_BYTES = 12
# How long `watch` waits before listening again after Redis went away.
WATCH_RETRY_S = 1.0
_INFO = b"agentgw upstream token cache v1"

# Delete the entry only if it still holds the value that was read: a newer token another node put
# since then stays.
_DISCARD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class TokenCacheSettings(BaseModel):
    """The exchanged-token cache shared by every node (with `redis_url`)."""

    # A named secret (`secrets:`) whose value keys the encryption of cached tokens; every node must
    # name the same one. Unset: each node caches in its own memory only.
    secret: str | None = None
    redis_prefix: str = "agentgw:token:"
    # How long a cache command may take before the node obtains the token itself.
    timeout_s: float = Field(default=0.5, gt=0, le=10)


class RedisTokenStore:
    """The shared tier of the credentials stage's token cache (its `SharedTokens` port)."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        prefix: str = "agentgw:token:",
        timeout_s: float = 0.5,
        settings: RedisSettings | None = None,
    ) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the token cache secret must have at least {MIN_SECRET_CHARS} characters")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret.encode())
        self._aead = AESGCM(key)
        self._redis = redis_client(url, settings)
        self._prefix = prefix
        self._channel = f"{prefix}evicted"
        self._timeout_s = timeout_s

    async def get(self, name: str) -> SharedToken | None:
        """The token stored under `name`, or None if there is none, or none this node can open.

        Raises:
            Unavailable: Redis did not answer in time.
        """
        key = self._prefix + name
        sealed, ttl_ms = await self._run(self._get(key))
        if sealed is None:
            return None
        token = self._open(key, sealed)
        if token is None:
            log.warning("token cache: an entry that does not decrypt was ignored")
            return None
        now = time.time()
        if ttl_ms >= 0:  # Redis's own expiry bounds it too, whatever the sealed time says
            token = replace(token, expires_at=min(token.expires_at, now + ttl_ms / 1000))
        return token if token.expires_at > now else None

    async def put(self, name: str, token: SharedToken) -> None:
        """Store `token` under `name` until it expires (nothing if it already has).

        Raises:
            Unavailable: Redis did not answer in time.
        """
        ttl_ms = int((token.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        key = self._prefix + name
        await self._run(self._redis.set(key, self._seal(key, token), px=ttl_ms))

    async def discard(self, name: str, authorization: str) -> None:
        """Delete the entry under `name` if it holds `authorization` (an upstream refused it).

        Raises:
            Unavailable: Redis did not answer in time.
        """
        key = self._prefix + name
        sealed = await self._run(self._redis.get(key))
        if sealed is not None:
            token = self._open(key, sealed)
            if token is None or token.authorization == authorization:
                await self._run(self._redis.eval(_DISCARD, 1, key, sealed))
        # Every node drops it from memory, whatever Redis held.
        await self._run(self._redis.publish(self._channel, f"{name} {token_digest(authorization)}"))

    async def watch(self, evicted: Callable[[str, str], None], lost: Callable[[], None]) -> None:
        """Call `evicted(name, token digest)` for every token any node discarded, until cancelled;
        `lost()` once each time listening broke off, since evictions may then have been missed."""
        listening = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                listening = True
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and isinstance(message.get("data"), bytes):
                        name, _, digest = message["data"].decode(errors="replace").partition(" ")
                        evicted(name, digest)
            except (RedisError, OSError):
                if listening:
                    lost()
                listening = False
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(WATCH_RETRY_S)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _get(self, key: str) -> tuple[bytes | None, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            sealed, ttl_ms = await pipe.execute()
        return sealed, int(ttl_ms)

    async def _run(self, command: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await command
        except (RedisError, TimeoutError, OSError) as exc:
            raise Unavailable("the token cache is unreachable") from exc

    def _seal(self, key: str, token: SharedToken) -> bytes:
        plain = json.dumps([token.authorization, token.header, list(token.actors), token.expires_at])
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plain.encode(), key.encode())

    def _open(self, key: str, sealed: bytes) -> SharedToken | None:
        """The token in `sealed`, or None unless it was sealed under this key for this entry."""
        try:
            plain = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], key.encode())
            authorization, header, actors, expires_at = json.loads(plain)
        except (InvalidTag, ValueError, TypeError):
            return None
        if not (
            isinstance(authorization, str)
            and isinstance(header, str)
            and isinstance(actors, list)
            and all(isinstance(actor, str) for actor in actors)
            and isinstance(expires_at, int | float)
        ):
            return None
        return SharedToken(authorization, header, tuple(actors), float(expires_at))
