"""A2A agents: what the config file declares (`a2a_agents`) and the cards the gateway fetches for them.

An agent is a name (part of the policy objects `a2a:<agent>/<skill>` and of its URL `/a2a/<agent>`),
its upstream card (fetched from `card_url` and refreshed every `card_refresh_s`, or given inline as
`card`), an optional default skill for messages that name none, and how the gateway authenticates to
it (`credential`: `none`; `static`, a secret declared in the config file (agentgw/registry/secrets.py); or
`client_credentials`, `token_exchange`, `id_jag`, the MCP upstream modes of agentgw/registry/models.py;
every mode is served by the credentials stage, as for MCP upstreams), and the keys its card's
signatures are verified with (`card_keys`, docs/decisions/0403). Declared in the config file:

    a2a_agents:
      - name: planner                       # policy objects a2a:planner/<skill>; URL /a2a/planner
        card_url: http://planner:9000/.well-known/agent-card.json
        default_skill: plan                 # for messages whose metadata names no skill
        credential: {mode: static, secret: planner-token}  # sent as `Authorization: Bearer <secret>`
        card_keys: {jwks_uri: http://planner:9000/jwks.json}  # the card must carry a signature by one

The card is read only for what routing and discovery need: the upstream's interfaces (binding,
version, URL, tenant; 1.0 `supportedInterfaces` or the 0.3 `url`/`preferredTransport`/
`additionalInterfaces` fields) and its skill ids. A card that cannot be fetched or makes no sense is
a `CardUnavailable`; a card fetched once keeps serving while a refresh fails.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentgw.registry.models import (
    LOCATION_REFUSED,
    Name,
    UpstreamClientCredentials,
    UpstreamIdJag,
    UpstreamLimits,
    UpstreamTokenExchange,
    Url,
)

__all__ = [
    "BINDINGS",
    "A2aAgentSpec",
    "A2aCredential",
    "A2aRegistry",
    "AgentInterface",
    "CardFetcher",
    "CardKeys",
    "CardSignatureInvalid",
    "CardUnavailable",
    "CardVerifier",
    "CredentialedAgent",
    "UpstreamCard",
    "card_interfaces",
    "card_skill_ids",
    "version_of",
]

log = logging.getLogger(__name__)

# The bindings the gateway proxies; gRPC interfaces of an upstream are not offered through it.
BINDINGS = ("JSONRPC", "HTTP+JSON")
# After a failed refresh, try again this soon (or at the agent's own refresh period, if shorter).
RETRY_AFTER_FAILURE_S = 10.0

# The well-known card paths (1.0, then 0.3): a card URL without them is the agent's base URL.
CARD_PATHS = ("/.well-known/agent-card.json", "/.well-known/agent.json")
# Asymmetric algorithms only: a public JWK must never be usable as an HMAC secret.
CardAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
CARD_ALGORITHMS: tuple[CardAlgorithm, ...] = get_args(CardAlgorithm)

Generation = Literal["1.0", "0.3"]
_VERSION = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.\d+)?")


class A2aCredential(BaseModel):
    """How the gateway authenticates to the agent: `none`, or `static`, the named secret (declared in
    the config file) sent as `<header>: <scheme> <secret>`.

    Never the caller's token; the secret itself never appears in a spec, so specs can be shown.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "static"] = "none"
    secret: Name | None = None
    header: str = Field(default="authorization", pattern=r"^[A-Za-z0-9-]+$")
    # Empty for headers that carry the bare secret (`X-Api-Key: <secret>`).
    scheme: str = Field(default="Bearer", pattern=r"^[A-Za-z0-9._-]*$")

    @model_validator(mode="before")
    @classmethod
    def _named_not_located(cls, data: object) -> object:
        if isinstance(data, dict) and ("env" in data or "file" in data):
            raise ValueError(LOCATION_REFUSED)
        return data

    @model_validator(mode="after")
    def _secret_matches_mode(self) -> A2aCredential:
        if self.mode == "static" and self.secret is None:
            raise ValueError("a static credential names its secret (`secret: <name>`)")
        if self.mode == "none" and self.secret is not None:
            raise ValueError("credential mode none takes no secret")
        return self


class CardKeys(BaseModel):
    """The keys an agent's card signatures are verified with: a JWKS by URL (`jwks_uri`, fetched with
    each card) or inline (`jwks`). Never the card's own `jku`: whoever forges a card would name their own.

    `required` (default): a card without signatures is refused too, so stripping them is no way around.
    """

    model_config = ConfigDict(extra="forbid")

    jwks_uri: Url | None = None
    jwks: dict[str, Any] | None = None
    algorithms: list[CardAlgorithm] = Field(default_factory=lambda: list(CARD_ALGORITHMS), min_length=1)
    required: bool = True

    @model_validator(mode="after")
    def _one_key_source(self) -> CardKeys:
        if (self.jwks_uri is None) == (self.jwks is None):
            raise ValueError("card_keys needs exactly one of jwks_uri and jwks")
        if self.jwks is not None and not isinstance(self.jwks.get("keys"), list):
            raise ValueError("card_keys.jwks must be a JWK set: an object with a `keys` list")
        return self


# The credential modes that get a token from a token service, as for MCP upstreams.
A2aTokenCredential = UpstreamClientCredentials | UpstreamTokenExchange | UpstreamIdJag


@dataclass(frozen=True, slots=True)
class CredentialedAgent:
    """An agent as the credentials stage sees it: a name that cannot meet an MCP server's (`a2a:<agent>`),
    the URL tokens are asked for (RFC 8707 resource, unless the credential names one), the credential."""

    name: str
    url: str | None
    credential: A2aCredential | A2aTokenCredential


class A2aAgentSpec(BaseModel):
    """An upstream A2A agent as declared in the config file (`a2a_agents`)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    # The upstream's card, e.g. http://agent:9000/.well-known/agent-card.json; or `card`, inline.
    card_url: Url | None = None
    card: dict[str, Any] | None = None
    # The skill a message that names none is for; without it such a message is refused.
    default_skill: str | None = Field(default=None, min_length=1, max_length=200)
    card_refresh_s: float = Field(default=300.0, gt=0, le=86400)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    enabled: bool = True
    # Served by the credentials stage, whatever the mode, as for MCP upstreams.
    credential: A2aCredential | A2aTokenCredential = Field(default_factory=A2aCredential)
    # Keys the upstream card's signatures must verify with; unset: signatures are not checked.
    card_keys: CardKeys | None = None
    limits: UpstreamLimits = Field(default_factory=UpstreamLimits)

    def resource_url(self) -> str | None:
        """The agent's URL, the default resource of its tokens: the card URL without its well-known
        path, or a static card's first interface."""
        if self.card_url is not None:
            for path in CARD_PATHS:
                if self.card_url.endswith(path):
                    return self.card_url[: -len(path)]
            return self.card_url
        assert self.card is not None
        return UpstreamCard.from_document(self.card).interfaces[0].url

    def credentialed(self) -> CredentialedAgent:
        """What the credentials stage needs to serve the agent's credential."""
        return CredentialedAgent(f"a2a:{self.name}", self.resource_url(), self.credential)

    @model_validator(mode="after")
    def _one_card_source(self) -> A2aAgentSpec:
        if (self.card_url is None) == (self.card is None):
            raise ValueError(f"A2A agent {self.name!r}: give exactly one of card_url and card")
        if self.card is not None:
            try:
                UpstreamCard.from_document(self.card)  # a static card must make sense at start-up
            except CardUnavailable as exc:
                raise ValueError(f"A2A agent {self.name!r}: {exc}") from exc
        return self


@dataclass(frozen=True, slots=True)
class AgentInterface:
    """One way to reach an agent: binding (`JSONRPC`, `HTTP+JSON`), major.minor version, URL, tenant."""

    url: str
    binding: str
    version: Generation
    tenant: str = ""


def version_of(value: object) -> Generation | None:
    """`1.0` for any 1.x, `0.3` for 0.3.x (and a missing version, the 0.3 default); None otherwise."""
    if value is None or value == "":
        return "0.3"
    match = _VERSION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major == 1:
        return "1.0"
    if (major, minor) == (0, 3):
        return "0.3"
    return None


def _interface(url: object, binding: object, version: object, tenant: object = "") -> AgentInterface | None:
    generation = version_of(version)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    if binding not in BINDINGS or generation is None:
        return None
    # Kept as declared: a JSON-RPC endpoint is POSTed to exactly this URL (trailing slash and all).
    return AgentInterface(url, str(binding), generation, tenant if isinstance(tenant, str) else "")


def card_interfaces(card: Mapping[str, Any]) -> list[AgentInterface]:
    """The JSON-RPC and HTTP+JSON interfaces a card declares, in its order of preference.

    1.0 cards list `supportedInterfaces`; a 0.3 card has `url` + `preferredTransport` (+
    `additionalInterfaces`, each with `transport`), all in the card's `protocolVersion`.
    """
    out: list[AgentInterface] = []
    declared = card.get("supportedInterfaces")
    if isinstance(declared, list):
        for item in declared:
            if isinstance(item, Mapping):
                found = _interface(
                    item.get("url"),
                    item.get("protocolBinding"),
                    item.get("protocolVersion"),
                    item.get("tenant", ""),
                )
                if found is not None:
                    out.append(found)
    legacy_version = card.get("protocolVersion", "0.3")
    if isinstance(card.get("url"), str):
        found = _interface(card["url"], card.get("preferredTransport", "JSONRPC"), legacy_version)
        if found is not None:
            out.append(found)
        extra = card.get("additionalInterfaces")
        for item in extra if isinstance(extra, list) else []:
            if isinstance(item, Mapping):
                found = _interface(item.get("url"), item.get("transport"), legacy_version)
                if found is not None:
                    out.append(found)
    return list(dict.fromkeys(out))


def card_skill_ids(card: Mapping[str, Any]) -> list[str]:
    """The ids of the skills a card lists (skills without a string id are ignored)."""
    skills = card.get("skills")
    if not isinstance(skills, list):
        return []
    return [s["id"] for s in skills if isinstance(s, Mapping) and isinstance(s.get("id"), str) and s["id"]]


class CardUnavailable(Exception):
    """The agent's card could not be fetched, or it declares no interface the gateway can use."""


class CardSignatureInvalid(CardUnavailable):
    """The agent's card failed signature verification against its `card_keys` (or is unsigned)."""


@dataclass(frozen=True, slots=True)
class UpstreamCard:
    """An upstream card as fetched, with what routing and discovery read from it."""

    document: Mapping[str, Any]
    interfaces: tuple[AgentInterface, ...]
    skills: tuple[str, ...]

    @classmethod
    def from_document(cls, document: object) -> UpstreamCard:
        """Read a card document.

        Raises:
            CardUnavailable: not a JSON object, or no JSON-RPC / HTTP+JSON interface in a known version.
        """
        if not isinstance(document, Mapping):
            raise CardUnavailable("the agent card is not a JSON object")
        interfaces = card_interfaces(document)
        if not interfaces:
            raise CardUnavailable(
                "the agent card declares no JSON-RPC or HTTP+JSON interface in A2A 1.0 or 0.3"
            )
        return cls(document, tuple(interfaces), tuple(card_skill_ids(document)))

    def endpoint(self, binding: str, version: Generation) -> AgentInterface | None:
        """The upstream interface for `binding` in `version`; another version of it if that is all there is.

        An agent whose card lists only one generation still answers for itself: forwarding to it gives
        the caller the agent's own error rather than the gateway's guess.
        """
        same_binding = [i for i in self.interfaces if i.binding == binding]
        for interface in same_binding:
            if interface.version == version:
                return interface
        return same_binding[0] if same_binding else None


CardFetcher = Callable[[str, float], Awaitable[object]]
# Checks a fetched card's signatures for an agent; raises CardSignatureInvalid.
CardVerifier = Callable[[A2aAgentSpec, Mapping[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class _Cached:
    card: UpstreamCard | None = None
    fetched_at: float = float("-inf")
    failed_at: float = float("-inf")
    error: str | None = None


class A2aRegistry:
    """The configured agents and their cards (fetched on first use, refreshed when stale).

    One fetch at a time per agent: concurrent callers wait for it instead of stampeding the upstream.
    """

    def __init__(
        self,
        agents: Iterable[A2aAgentSpec],
        fetch: CardFetcher,
        clock: Callable[[], float] = time.monotonic,
        verify: CardVerifier | None = None,
    ) -> None:
        self._agents = {a.name: a for a in agents}
        self._fetch = fetch
        self._verify = verify
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def agent(self, name: str) -> A2aAgentSpec | None:
        spec = self._agents.get(name)
        return spec if spec is not None and spec.enabled else None

    def agents(self) -> Sequence[A2aAgentSpec]:
        return [a for a in self._agents.values() if a.enabled]

    async def card(self, spec: A2aAgentSpec) -> UpstreamCard:
        """The agent's card: the static one, the cached one while fresh, else a new fetch.

        Raises:
            CardUnavailable: never fetched successfully, or the last fetch failed only moments ago.
        """
        if spec.card is not None:
            return UpstreamCard.from_document(spec.card)
        assert spec.card_url is not None
        cached = self._cache.setdefault(spec.name, _Cached())
        if self._fresh(spec, cached):
            assert cached.card is not None
            return cached.card
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            if self._fresh(spec, cached):
                assert cached.card is not None
                return cached.card
            # A failed fetch is not retried at once: a dead upstream must not cost every caller a timeout.
            if self._may_retry(spec, cached):
                await self._refresh(spec, cached)
            if cached.card is None:
                raise CardUnavailable(cached.error or "the agent card could not be fetched")
            return cached.card

    def _fresh(self, spec: A2aAgentSpec, cached: _Cached) -> bool:
        return cached.card is not None and self._clock() - cached.fetched_at < spec.card_refresh_s

    def _may_retry(self, spec: A2aAgentSpec, cached: _Cached) -> bool:
        return self._clock() - cached.failed_at >= min(spec.card_refresh_s, RETRY_AFTER_FAILURE_S)

    async def _refresh(self, spec: A2aAgentSpec, cached: _Cached) -> None:
        assert spec.card_url is not None
        try:
            card = UpstreamCard.from_document(await self._fetch(spec.card_url, spec.timeout_s))
            if self._verify is not None:
                await self._verify(spec, card.document)
        except CardSignatureInvalid as exc:
            # Never silently trusted: refused, loudly. A card verified earlier keeps serving (as after
            # any failed refresh), so a forger on the path cannot replace it, only fail to.
            cached.failed_at = self._clock()
            cached.error = f"the agent card of {spec.name!r} was refused: {exc}"
            log.error("agent card refused: %s", exc, extra={"agent": spec.name})
            return
        except Exception as exc:  # any fetch failure is the same to callers: no usable card
            cached.failed_at = self._clock()
            cached.error = f"the agent card of {spec.name!r} could not be fetched: {exc}"
            if cached.card is not None:
                log.warning(
                    "agent card refresh failed; serving the last good card", extra={"agent": spec.name}
                )
            return
        cached.card, cached.fetched_at, cached.error = card, self._clock(), None
