"""Credentials stage: the upstream gets a credential meant for it, never the caller's token.

Each MCP upstream names a credential mode in the registry (`McpServerSpec.credential`), served by one
`CredentialSource` per upstream; an A2A agent and an LLM route with a credential are served the same
way (`A2aAgentSpec.credentialed()`, `LlmRouteSpec.token_upstream()`, named `a2a:<agent>` and
`llm:<route>` here so they never meet an MCP server's name):

    none                no Authorization header
    static              a named secret (declared in the config file, agentgw/registry/secrets.py), read once;
                        an A2A agent may take it in another header, or without the `Bearer` scheme
    client_credentials  the gateway's own token (RFC 6749 4.4) from a token endpoint
    token_exchange      RFC 8693: the caller's token exchanged for one meant for the upstream, with
                        the gateway's own token as the actor token, so the upstream sees `act`
    id_jag              enterprise-managed authorization: an ID-JAG from the IdP (RFC 8693), then
                        the RFC 7523 jwt-bearer grant at the upstream's authorization server

There is no passthrough mode, and no fallback: a credential that cannot be obtained fails the call
with `CredentialError` (the audit stage records it). Tokens are cached per (caller token hash,
upstream, scopes, credential configuration) until shortly before they expire; concurrent first calls
for one key share one request (single flight). With a shared store (Redis, behind each node's memory),
a token one node obtained serves every node (docs/decisions/0605). When the upstream answers 401, the
terminal raises `UpstreamUnauthorized`: this stage drops the token it sent, on every node, and retries
once with a fresh one.

An LLM call may be tried on several routes in turn (fallbacks): `Call.switch_upstream`, set here,
moves it to the next one with that route's credential, obtained by the same sources and cache.

Bridged upstreams (one SDK session shared by every caller) can only carry the gateway's own identity:
`session_credential` gives their HTTP client a header source; per-caller modes are served by the
pass-through only (docs/decisions/0602).

One module, though long: the credential sources and the token cache are the stage's own, used by
nothing else, and each source is small; apart they would only import one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol, TypeAlias

import httpx
import jwt

from agentgw.call import Call, Principal, Reply
from agentgw.errors import ConfigError, CredentialError, Unavailable, UpstreamUnauthorized
from agentgw.oauth.apikeys import KEY_PREFIX
from agentgw.oauth.exchange import (
    ACCESS_TOKEN_TYPE,
    ID_JAG_TOKEN_TYPE,
    JWT_BEARER,
    TOKEN_EXCHANGE,
    TOKEN_TYPES,
    TokenAnswer,
    TokenEndpoint,
    check_exchanged,
    unverified_claims,
)
from agentgw.pipeline import CallNext
from agentgw.records.credentials import GatewayCredential, SharedToken, token_digest
from agentgw.registry.a2a import A2aCredential
from agentgw.registry.models import (
    ClientAuth,
    McpServerSpec,
    UpstreamClientCredentials,
    UpstreamCredential,
    UpstreamIdJag,
    UpstreamStatic,
    UpstreamTokenExchange,
)
from agentgw.registry.secrets import Secret, SecretRefused, Secrets, SecretUnavailable

__all__ = [
    "CacheKey",
    "CredentialConfigError",
    "CredentialSource",
    "CredentialedUpstream",
    "Credentials",
    "GatewayCredential",
    "IssuedCredential",
    "MemoryTokenCache",
    "SharedTokens",
    "TokenCache",
    "TokenService",
    "caller_key",
    "chain_of",
    "config_digest",
    "refresh_at",
    "scopes_for",
    "shared_name",
]

log = logging.getLogger(__name__)

# A cached token is replaced this long before it expires, so no call carries a dying one; a token
# that lives less than twice this is replaced at half its life.
EARLY_RENEWAL_S = 30.0
MAX_CACHED_TOKENS = 10_000


class CredentialConfigError(ConfigError):
    """An upstream's credential cannot be set up: its secret is missing or unusable (at start-up)."""


# --- pure pieces -----------------------------------------------------------------------------------


class CacheKey(NamedTuple):
    """What a cached token is for: the caller (token hash; "" for the gateway's own identity), the
    upstream, the scopes, what it is (the upstream's token, or the gateway's actor token), and a digest
    of the upstream's credential configuration (mode, token service, client, audience, resource)."""

    caller: str
    upstream: str
    scopes: tuple[str, ...]
    purpose: str = "upstream"
    config: str = ""


def shared_name(key: CacheKey) -> str:
    """The name of `key`'s entry in the cache every node shares: a digest of every part of the key,
    so no name holds a token, and two keys that differ in anything never share an entry."""
    parts = [key.caller, key.upstream, list(key.scopes), key.purpose, key.config]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def config_digest(credential: UpstreamCredential | A2aCredential, url: str | None) -> str:
    """A digest of what an upstream's tokens depend on besides the caller and scopes."""
    return hashlib.sha256(json.dumps([credential.model_dump(mode="json"), url]).encode()).hexdigest()


def caller_key(token: str) -> str:
    """The cache key of a caller's token: its SHA-256, so no cache key holds a usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


def refresh_at(now: float, lifetime_s: float) -> float:
    """When a token obtained at `now` and valid `lifetime_s` seconds must be replaced."""
    return now + max(lifetime_s - EARLY_RENEWAL_S, lifetime_s / 2)


def scopes_for(
    base: Iterable[str], per_tool: dict[str, list[str]], resource: str, upstream: str
) -> tuple[str, ...]:
    """The scopes a call of `resource` (a policy object) needs upstream: `base`, plus the tool's own
    scopes when the call names a tool of `upstream` (`mcp:<upstream>/<tool>`)."""
    scopes = set(base)
    prefix = f"mcp:{upstream}/"
    if resource.startswith(prefix):
        tool = resource[len(prefix) :]
        if "/" not in tool:  # prompts and resources are `prompt/<name>`, `resource/<uri>`
            scopes.update(per_tool.get(tool, ()))
    return tuple(sorted(scopes))


def chain_of(token: str) -> tuple[str, ...]:
    """The `act` chain of a JWT, current actor first, as `client:<sub>`; empty if it has none.

    Read without verifying: only to name the chain in the audit record. The upstream verifies.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ()
    actors: list[str] = []
    act = claims.get("act")
    while isinstance(act, dict) and isinstance(act.get("sub"), str) and len(actors) < 16:
        actors.append(f"client:{act['sub']}")
        act = act.get("act")
    return tuple(actors)


# --- the cache -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """A credential ready to send.

    Attributes:
        authorization: the Authorization header value (never log it).
        refresh_at: monotonic time after which it must not be used; `None` for a static secret.
        actors: the delegation chain the upstream will see, current first (for audit).
        header: the header that carries `authorization` upstream.
    """

    authorization: str = field(repr=False)
    refresh_at: float | None = None
    actors: tuple[str, ...] = ()
    header: str = "authorization"


Fetch = Callable[[], Awaitable[IssuedCredential]]


class TokenCache(Protocol):
    """Issued credentials by `CacheKey`, with single flight for concurrent misses."""

    async def get(self, key: CacheKey, fetch: Fetch) -> IssuedCredential:
        """The cached credential for `key`, else the one `fetch` obtains (once for all waiters).

        Raises:
            CredentialError: `fetch` failed (every concurrent waiter gets the same error).
        """
        ...

    async def drop(self, key: CacheKey, stale: IssuedCredential) -> None:
        """Forget `stale` for `key` (an upstream refused it), unless it was already replaced."""
        ...

    def drop_upstream(self, upstream: str) -> None:
        """Forget every credential for `upstream` (its configuration changed)."""
        ...

    async def aclose(self) -> None: ...


class SharedTokens(Protocol):
    """Tokens every gateway node reads (Redis, agentgw/storage/token_cache.py), by `shared_name`.

    Each method raises `Unavailable` when the store does not answer in time.
    """

    async def get(self, name: str) -> SharedToken | None:
        """The live token stored under `name`; None if there is none this node can read."""
        ...

    async def put(self, name: str, token: SharedToken) -> None:
        """Store `token` under `name` until it expires."""
        ...

    async def discard(self, name: str, authorization: str) -> None:
        """Delete the entry under `name` if it holds `authorization`, and tell every node."""
        ...

    async def watch(self, evicted: Callable[[str, str], None], lost: Callable[[], None]) -> None:
        """Call `evicted(name, token_digest)` for each token any node discarded, until cancelled;
        `lost()` when listening broke off (evictions may have been missed). Never raises."""
        ...

    async def aclose(self) -> None: ...


class MemoryTokenCache:
    """The embedded `TokenCache`: one process's memory, bounded; with `shared`, a miss asks the store
    every node shares before obtaining a token, and what it obtains goes there too.

    The shared store is an optimisation: when it does not answer, tokens are obtained here as without
    it, and what it holds is never taken on trust (an entry it cannot open is a miss).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_CACHED_TOKENS,
        shared: SharedTokens | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._max = max_entries
        self._shared = shared
        self._entries: dict[CacheKey, IssuedCredential] = {}
        self._inflight: dict[CacheKey, asyncio.Task[IssuedCredential]] = {}
        # The token an upstream refused last, per key: not taken back from the shared store, which
        # may still hold it if it could not be deleted there.
        self._refused: dict[CacheKey, str] = {}
        self._shared_down = False  # logged once per outage, not once per miss
        # The entries that went through the shared store, by name: only these can be refused on
        # another node, which then tells every node to drop them (`_evicted`).
        self._names: dict[str, CacheKey] = {}
        self._watching: asyncio.Task[None] | None = None
        # Lookups by (upstream, "hit", "shared" or "miss"), for metrics; upstreams are the registry's
        # names. "shared": a miss here that the shared store answered; "evicted" counts tokens dropped
        # because another node's upstream refused them.
        self.lookups: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _fresh(self, issued: IssuedCredential | None) -> bool:
        return issued is not None and (issued.refresh_at is None or self._clock() < issued.refresh_at)

    async def get(self, key: CacheKey, fetch: Fetch) -> IssuedCredential:
        issued = self._entries.get(key)
        if issued is not None and self._fresh(issued):
            self._count(key, "hit")
            return issued
        self._count(key, "miss")
        if self._shared is not None and self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(
                self._shared.watch(self._evicted, self._lost_evictions)
            )
        task = self._inflight.get(key)
        if task is None:
            # Its own task: a caller that goes away must not cancel the fetch the others wait for.
            task = asyncio.get_running_loop().create_task(self._fill(key, fetch))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    def _count(self, key: CacheKey, result: str) -> None:
        counted = (key.upstream, result)
        self.lookups[counted] = self.lookups.get(counted, 0) + 1

    def _settled(self, key: CacheKey, task: asyncio.Task[IssuedCredential]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited any more is not reported

    async def _fill(self, key: CacheKey, fetch: Fetch) -> IssuedCredential:
        issued = await self._from_shared(key)
        if issued is None:
            issued = await fetch()
            await self._to_shared(key, issued)
        self._refused.pop(key, None)
        if len(self._entries) >= self._max:
            self._evict()
        self._entries[key] = issued
        return issued

    async def _from_shared(self, key: CacheKey) -> IssuedCredential | None:
        if self._shared is None:
            return None
        try:
            token = await self._shared.get(shared_name(key))
        except Unavailable:
            self._lost_shared()
            return None
        self._found_shared()
        if token is None or token.authorization == self._refused.get(key):
            return None
        self._count(key, "shared")
        self._remember(key)
        refresh = self._clock() + (token.expires_at - self._wall())
        return IssuedCredential(token.authorization, refresh, token.actors, token.header)

    async def _to_shared(self, key: CacheKey, issued: IssuedCredential) -> None:
        # A static secret is read from the node's own configuration: nothing to share.
        if self._shared is None or issued.refresh_at is None:
            return
        expires_at = self._wall() + (issued.refresh_at - self._clock())
        token = SharedToken(issued.authorization, issued.header, issued.actors, expires_at)
        try:
            await self._shared.put(shared_name(key), token)
        except Unavailable:
            self._lost_shared()
            return
        self._remember(key)

    def _remember(self, key: CacheKey) -> None:
        if len(self._names) >= 2 * self._max:  # forget the names of entries no longer here
            self._names = {n: k for n, k in self._names.items() if k in self._entries}
        self._names[shared_name(key)] = key

    def _evicted(self, name: str, digest: str) -> None:
        key = self._names.get(name)
        issued = self._entries.get(key) if key is not None else None
        if key is not None and issued is not None and token_digest(issued.authorization) == digest:
            del self._entries[key]
            self._count(key, "evicted")

    def _lost_evictions(self) -> None:
        # Another node may have seen one of these refused meanwhile: read them from Redis again.
        for key in self._names.values():
            self._entries.pop(key, None)
        self._names.clear()

    def _lost_shared(self) -> None:
        if not self._shared_down:
            self._shared_down = True
            log.warning("token cache: the shared store is unreachable; obtaining tokens on this node")

    def _found_shared(self) -> None:
        if self._shared_down:
            self._shared_down = False
            log.info("token cache: the shared store answers again")

    def _evict(self) -> None:
        for key in [k for k, v in self._entries.items() if not self._fresh(v)]:
            del self._entries[key]
        while len(self._entries) >= self._max:  # still full of live tokens: drop the oldest
            del self._entries[next(iter(self._entries))]

    async def drop(self, key: CacheKey, stale: IssuedCredential) -> None:
        if self._entries.get(key) is stale:
            del self._entries[key]
        if self._shared is None or stale.refresh_at is None:
            return
        self._refused[key] = stale.authorization
        if len(self._refused) > self._max:
            del self._refused[next(iter(self._refused))]
        try:
            await self._shared.discard(shared_name(key), stale.authorization)
        except Unavailable:
            self._lost_shared()

    def drop_upstream(self, upstream: str) -> None:
        # Shared entries need no deletion: their names hold the old configuration's digest.
        for key in [k for k in self._entries if k.upstream == upstream]:
            del self._entries[key]

    async def aclose(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        if self._shared is not None:
            await self._shared.aclose()


# --- sources ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenService:
    """A token endpoint reached through `http`: the built-in authorization server is one, in-process."""

    url: str
    http: httpx.AsyncClient


class CredentialSource(Protocol):
    """How one upstream's credential is obtained.

    Attributes:
        mode: the credential mode, for audit.
        per_caller: the credential stands for the caller (cached per caller token).
        refreshable: asking again may give a different credential (worth a retry after a 401).
    """

    mode: str
    per_caller: bool
    refreshable: bool

    def scopes(self, resource: str) -> tuple[str, ...]:
        """The scopes a call of `resource` needs upstream."""
        ...

    async def obtain(self, principal: Principal | None, scopes: tuple[str, ...]) -> IssuedCredential:
        """A fresh credential for `principal` (None for the gateway's own identity).

        Raises:
            CredentialError: it cannot be obtained.
        """
        ...


def _read_secret(secrets: Secrets, name: str, what: str) -> Secret:
    try:
        return secrets.read(name)
    except SecretUnavailable as exc:
        # Where the secret lives goes to the log only: the error may reach the admin API.
        log.error("%s: secret %r: %s", what, name, exc.detail)
        raise CredentialConfigError(f"{what}: {exc}") from exc
    except SecretRefused as exc:
        raise CredentialConfigError(f"{what}: {exc}") from exc


def _subject_token(principal: Principal | None, label: str) -> str:
    token = principal.credential if principal is not None else None
    if not token or token.startswith(KEY_PREFIX):
        # An API key or no credential at all: nothing an STS could exchange. Never another mode.
        raise CredentialError(
            f"{label}: the upstream needs a token exchanged from the caller's OAuth access token; "
            "anonymous callers and API keys cannot be exchanged"
        )
    return token


def _bearer(answer: TokenAnswer, now: float, label: str, actors: tuple[str, ...] = ()) -> IssuedCredential:
    if answer.lifetime_s <= 0:
        raise CredentialError(f"{label}: the token service issued a token that has already expired")
    return IssuedCredential(f"Bearer {answer.access_token}", refresh_at(now, answer.lifetime_s), actors)


def _within_caller(issued: IssuedCredential, now: float, caller: Mapping[str, Any]) -> IssuedCredential:
    """`issued`, cached no longer than the caller's token lives: a token that stands for the caller
    must not keep serving after the caller's own has expired, however long the service made it."""
    exp = caller.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or issued.refresh_at is None:
        return issued
    return replace(issued, refresh_at=min(issued.refresh_at, now + (float(exp) - time.time())))


class _Static:
    mode = "static"
    per_caller = False
    refreshable = False

    def __init__(self, secret: Secret, header: str = "authorization", scheme: str = "Bearer") -> None:
        self._secret = secret
        self._header = header
        self._scheme = scheme

    def scopes(self, resource: str) -> tuple[str, ...]:
        return ()

    async def obtain(self, principal: Principal | None, scopes: tuple[str, ...]) -> IssuedCredential:
        secret = self._secret.reveal()
        return IssuedCredential(f"{self._scheme} {secret}" if self._scheme else secret, header=self._header)


class _ClientCredentials:
    mode = "client_credentials"
    per_caller = False
    refreshable = True

    def __init__(
        self,
        name: str,
        spec: UpstreamClientCredentials,
        endpoint: TokenEndpoint,
        resource: str | None,
        clock: Callable[[], float],
    ) -> None:
        self._spec = spec
        self._endpoint = endpoint
        self._resource = resource
        self._clock = clock
        self._label = f"upstream {name!r}"

    def scopes(self, resource: str) -> tuple[str, ...]:
        return tuple(sorted(set(self._spec.scopes)))

    async def obtain(self, principal: Principal | None, scopes: tuple[str, ...]) -> IssuedCredential:
        answer = await self._endpoint.request(
            {
                "grant_type": "client_credentials",
                "scope": " ".join(scopes) or None,
                "resource": self._resource,
                "audience": self._spec.audience,
            },
            "client credentials grant",
        )
        return _bearer(answer, self._clock(), self._label)


class _TokenExchange:
    mode = "token_exchange"
    per_caller = True
    refreshable = True

    def __init__(
        self,
        name: str,
        spec: UpstreamTokenExchange,
        endpoint: TokenEndpoint,
        resource: str | None,
        cache: TokenCache,
        clock: Callable[[], float],
        config: str = "",
    ) -> None:
        self._name = name
        self._config = config
        self._spec = spec
        self._endpoint = endpoint
        self._resource = resource
        self._cache = cache
        self._clock = clock
        self._label = f"upstream {name!r}"

    def scopes(self, resource: str) -> tuple[str, ...]:
        return scopes_for(self._spec.scopes, self._spec.tool_scopes, resource, self._name)

    async def _actor_token(self) -> str:
        # The gateway's own token at the same service; shared by every caller of this upstream.
        async def fetch() -> IssuedCredential:
            answer = await self._endpoint.request(
                {"grant_type": "client_credentials"}, "actor token request (client credentials)"
            )
            return _bearer(answer, self._clock(), self._label)

        issued = await self._cache.get(CacheKey("", self._name, (), "actor", self._config), fetch)
        return issued.authorization.removeprefix("Bearer ")

    async def obtain(self, principal: Principal | None, scopes: tuple[str, ...]) -> IssuedCredential:
        subject = _subject_token(principal, self._label)
        spec = self._spec
        requested = TOKEN_TYPES[spec.requested_token_type]
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": TOKEN_TYPES[spec.subject_token_type],
            "requested_token_type": requested,
            "resource": self._resource,
            "audience": spec.audience,
            "scope": " ".join(scopes) or None,
        }
        if spec.actor_token:
            form["actor_token"] = await self._actor_token()
            form["actor_token_type"] = ACCESS_TOKEN_TYPE
        answer = await self._endpoint.request(form, "subject token exchange")
        if answer.issued_token_type not in (None, requested, ACCESS_TOKEN_TYPE):
            raise CredentialError(
                f"{self._label}: the subject token exchange failed: the token service issued a "
                f"{answer.issued_token_type}"
            )
        caller = unverified_claims(subject) or {}
        try:
            check_exchanged(answer, str(caller.get("sub")), scopes or (principal.scopes if principal else ()))
        except ValueError as exc:
            log.warning("exchanged token refused upstream=%s reason=%s", self._name, exc)
            raise CredentialError(
                f"{self._label}: the subject token exchange failed: the token service's answer was "
                f"refused: {exc}"
            ) from exc
        now = self._clock()
        return _within_caller(_bearer(answer, now, self._label, chain_of(answer.access_token)), now, caller)


class _IdJag:
    mode = "id_jag"
    per_caller = True
    refreshable = True

    def __init__(
        self,
        name: str,
        spec: UpstreamIdJag,
        idp: TokenEndpoint,
        authorization_server: TokenEndpoint,
        resource: str | None,
        clock: Callable[[], float],
    ) -> None:
        self._name = name
        self._spec = spec
        self._idp = idp
        self._as = authorization_server
        self._resource = resource
        self._clock = clock
        self._label = f"upstream {name!r}"

    def scopes(self, resource: str) -> tuple[str, ...]:
        return scopes_for(self._spec.scopes, self._spec.tool_scopes, resource, self._name)

    async def obtain(self, principal: Principal | None, scopes: tuple[str, ...]) -> IssuedCredential:
        subject = _subject_token(principal, self._label)
        scope = " ".join(scopes) or None
        grant = await self._idp.request(
            {
                "grant_type": TOKEN_EXCHANGE,
                "requested_token_type": ID_JAG_TOKEN_TYPE,
                "audience": self._spec.authorization_server,
                "resource": self._resource,
                "scope": scope,
                "subject_token": subject,
                "subject_token_type": TOKEN_TYPES[self._spec.subject_token_type],
            },
            "ID-JAG exchange",
        )
        if grant.issued_token_type != ID_JAG_TOKEN_TYPE:
            raise CredentialError(f"{self._label}: the identity provider did not issue an ID-JAG")
        answer = await self._as.request(
            {
                "grant_type": JWT_BEARER,
                "assertion": grant.access_token,
                "scope": scope,
                "resource": self._resource,
            },
            "jwt-bearer grant",
        )
        now = self._clock()
        issued = _bearer(answer, now, self._label, chain_of(answer.access_token))
        return _within_caller(issued, now, unverified_claims(subject) or {})


# --- the stage -------------------------------------------------------------------------------------


class CredentialedUpstream(Protocol):
    """What a source is built from: an MCP server's spec, or an A2A agent's (`CredentialedAgent`)."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str | None: ...

    @property
    def credential(self) -> UpstreamCredential | A2aCredential: ...


Lookup: TypeAlias = Callable[[str], CredentialedUpstream | None]


class _SharedCredential:
    def __init__(self, stage: Credentials, spec: McpServerSpec) -> None:
        self._stage = stage
        self._spec = spec
        self._last: IssuedCredential | None = None

    async def authorization(self, *, refresh: bool = False) -> str:
        source = self._stage.source(self._spec)
        assert source is not None and not source.per_caller
        scopes = source.scopes(f"mcp:{self._spec.name}")
        key = CacheKey("", self._spec.name, scopes, config=self._stage.config_of(self._spec.name))
        if refresh and self._last is not None:
            await self._stage.cache.drop(key, self._last)
        self._last = await self._stage.cache.get(key, lambda: source.obtain(None, scopes))
        return self._last.authorization


class Credentials:
    """The credentials stage: sets `call.upstream_authorization` for MCP upstreams, A2A agents and LLM
    routes, from their mode.

    `servers` finds an MCP upstream's spec by name (the registry), `agents` an A2A agent's, `models` an
    LLM route's that sends a credential; without them no upstream gets a credential. For calls whose
    upstream has none here, this stage only makes sure nothing of the caller's travels.
    """

    def __init__(
        self,
        servers: Lookup = lambda _name: None,
        *,
        agents: Lookup = lambda _name: None,
        models: Lookup = lambda _name: None,
        builtin: TokenService | None = None,
        http: httpx.AsyncClient | None = None,
        cache: TokenCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        secrets: Secrets | None = None,
    ) -> None:
        self._servers = servers
        self._secrets = secrets or Secrets({})
        self._agents = agents
        self._models = models
        self._builtin = builtin
        self._http = http  # made on first use: most upstreams need no token service
        self._clock = clock
        self.cache: TokenCache = cache if cache is not None else MemoryTokenCache(clock=clock)
        self._sources: dict[
            str, tuple[tuple[UpstreamCredential | A2aCredential, str | None], CredentialSource | None]
        ] = {}
        self._digests: dict[str, str] = {}  # upstream -> `config_digest` of its source's configuration

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._builtin is not None:
            await self._builtin.http.aclose()
        await self.cache.aclose()

    def prepare(self, specs: Iterable[CredentialedUpstream]) -> None:
        """Set up every upstream's source now, reading secrets: a missing secret stops start-up.

        Raises:
            CredentialConfigError: a secret is missing or unusable, or a token endpoint is not configured.
        """
        for spec in specs:
            self.source(spec)

    def source(self, spec: CredentialedUpstream) -> CredentialSource | None:
        """The source for `spec` (None for mode none), built again when its configuration changed.

        Raises:
            CredentialConfigError: a secret is missing or unusable, or a token endpoint is not configured.
        """
        config = (spec.credential, spec.url)
        known = self._sources.get(spec.name)
        if known is not None and known[0] == config:
            return known[1]
        digest = config_digest(*config)
        source = self._build(spec, digest)
        if known is not None:
            self.cache.drop_upstream(spec.name)
        self._sources[spec.name] = (config, source)
        self._digests[spec.name] = digest
        return source

    def config_of(self, upstream: str) -> str:
        """The digest of `upstream`'s credential configuration, part of its tokens' cache keys."""
        return self._digests.get(upstream, "")

    def session_credential(self, spec: McpServerSpec) -> GatewayCredential | None:
        """For a session shared by every caller: the gateway's own credential, or None for mode none.

        Raises:
            CredentialConfigError: the mode is per caller (such upstreams are never bridged), or the
                source cannot be set up.
        """
        if spec.per_caller_credential:
            raise CredentialConfigError(
                f"upstream {spec.name!r}: a {spec.credential.mode} credential is per caller"
            )
        return None if self.source(spec) is None else _SharedCredential(self, spec)

    def _endpoint(self, url: str | None, client: ClientAuth, timeout_s: float, label: str) -> TokenEndpoint:
        if url is None:
            if self._builtin is None:
                raise CredentialConfigError(
                    f"{label}: token_url is required (the built-in authorization server is off)"
                )
            url, http = self._builtin.url, self._builtin.http
        else:
            if self._http is None:
                self._http = httpx.AsyncClient(follow_redirects=False)
            http = self._http
        secret = _read_secret(self._secrets, client.secret, f"{label}, client {client.client_id!r}")
        try:
            return TokenEndpoint(url, client, secret, http, timeout_s=timeout_s, label=label)
        except ValueError as exc:
            raise CredentialConfigError(
                f"{label}, client {client.client_id!r}: the private key is unusable: {exc}"
            ) from exc

    def _build(self, spec: CredentialedUpstream, digest: str) -> CredentialSource | None:
        credential = spec.credential
        label = f"upstream {spec.name!r}"
        if credential.mode == "none":
            return None
        if isinstance(credential, UpstreamStatic):
            return _Static(_read_secret(self._secrets, credential.secret, label))
        if isinstance(credential, A2aCredential):
            assert credential.secret is not None  # a static credential names its secret
            secret = _read_secret(self._secrets, credential.secret, label)
            return _Static(secret, credential.header.lower(), credential.scheme)
        resource = credential.resource or spec.url  # None: the token request names no resource
        if isinstance(credential, UpstreamClientCredentials):
            endpoint = self._endpoint(credential.token_url, credential.client, credential.timeout_s, label)
            return _ClientCredentials(spec.name, credential, endpoint, resource, self._clock)
        if isinstance(credential, UpstreamTokenExchange):
            endpoint = self._endpoint(credential.token_url, credential.client, credential.timeout_s, label)
            return _TokenExchange(spec.name, credential, endpoint, resource, self.cache, self._clock, digest)
        assert isinstance(credential, UpstreamIdJag)
        idp = self._endpoint(credential.idp_token_url, credential.idp_client, credential.timeout_s, label)
        authorization_server = self._endpoint(
            credential.token_url, credential.client, credential.timeout_s, label
        )
        return _IdJag(spec.name, credential, idp, authorization_server, resource, self._clock)

    async def _issue(self, call: Call, source: CredentialSource, key: CacheKey) -> IssuedCredential:
        principal = call.principal if source.per_caller else None
        issued = await self.cache.get(key, lambda: source.obtain(principal, key.scopes))
        call.upstream_authorization = issued.authorization
        call.upstream_authorization_header = issued.header
        call.upstream_actors = issued.actors
        return issued

    async def _credential(
        self, call: Call, spec: CredentialedUpstream
    ) -> tuple[CredentialSource, CacheKey, IssuedCredential] | None:
        """Set `call`'s credential for `spec`; the source, key and credential, or None for mode none."""
        try:
            source = self.source(spec)
        except CredentialConfigError as exc:
            log.error("upstream credential unavailable: %s", exc)
            raise CredentialError(
                f"upstream {spec.name!r}: its credential is not configured correctly"
            ) from exc
        call.credential_mode = spec.credential.mode
        if source is None:
            return None
        caller = ""
        if source.per_caller:
            caller = caller_key(_subject_token(call.principal, f"upstream {spec.name!r}"))
        key = CacheKey(caller, spec.name, source.scopes(call.resource), config=self._digests[spec.name])
        return source, key, await self._issue(call, source, key)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        # Defence in depth: whatever an earlier stage did, the caller's credentials never go upstream.
        call.upstream_authorization = None
        call.upstream_authorization_header = "authorization"
        lookup = {"mcp": self._servers, "a2a": self._agents, "llm": self._models}.get(call.protocol)
        # A reply from the gateway's own copy needs no upstream credential (so anonymous callers may
        # read an agent's public card even when the agent's mode is per caller).
        if not call.reaches_upstream:
            lookup = None
        if lookup is None:
            return await call_next(call)
        first = call.upstream

        async def switch(upstream: str) -> None:
            call.upstream = upstream
            call.upstream_authorization = None
            call.upstream_authorization_header = "authorization"
            call.credential_mode = None
            call.upstream_actors = ()
            spec = lookup(upstream)
            if spec is not None:
                await self._credential(call, spec)

        call.switch_upstream = switch
        spec = lookup(first)
        issued = await self._credential(call, spec) if spec is not None else None
        if issued is None:
            return await call_next(call)
        source, key, credential = issued
        try:
            return await call_next(call)
        except UpstreamUnauthorized:
            if not source.refreshable or call.upstream != first:
                raise
            # The upstream refused the token (revoked, rotated keys, expired early): one fresh try.
            log.info("upstream %s refused its credential (401); obtaining a new one", key.upstream)
            await self.cache.drop(key, credential)
            await self._issue(call, source, key)
            return await call_next(call)
