"""LLM model routes: a virtual model name (what callers ask for) -> a provider endpoint and model id.

Declared in the config file under `llm_routes`:

    llm_routes:
      - name: fast                          # the virtual model; policy object `llm:fast`
        base_url: https://api.openai.com/v1 # OpenAI-compatible; requests go to <base_url>/chat/completions
        model: gpt-4o-mini                  # the provider's model id
        credential: {mode: static, secret: openai-key}   # a secret declared under `secrets:`
                                            # or client_credentials, token_exchange (as for MCP upstreams)
        input_price: 0.15                   # per MILLION input (prompt) tokens
        output_price: 0.60                  # per MILLION output (completion) tokens
        timeout_s: 60                       # wait for the first byte, and at most between stream chunks
        fallbacks: [fast-backup]            # other routes tried, in order, on 5xx, timeout or unreachable

Secrets never live in a spec: a spec names a secret declared in the config file (agentgw/registry/secrets.py).
The credentials stage reads it once at start-up and obtains, caches and renews the route's credential
as it does an MCP upstream's (`LlmRouteSpec.token_upstream`), so specs may be stored, logged and
returned by an admin API without leaking anything, and every protocol's credentials follow one rule.

Prices are per million tokens, in whatever currency the operator uses throughout (the unit providers
publish); `LlmRoute.cost` turns token counts into that currency.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agentgw.registry.models import (
    ClientAuth,
    NamedSecret,
    UpstreamClientCredentials,
    UpstreamLimits,
    UpstreamStatic,
    UpstreamTokenExchange,
    Url,
    credential_secrets,
)

__all__ = [
    "MODEL_NAME_PATTERN",
    "ClientCredentials",
    "LlmRoute",
    "LlmRouteError",
    "LlmRouteList",
    "LlmRouteSpec",
    "LlmRoutes",
    "LlmTokenUpstream",
    "NoCredential",
    "StaticCredential",
    "check_routes",
    "route_secrets",
    "token_upstreams",
    "validate_model_name",
]

# Like registry names, plus `.` (model names such as `gpt-4.1` are the norm). Still no `/`, `*`, `:`
# or whitespace: the name becomes the policy object `llm:<name>` and must not widen a pattern.
MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?$")
_PROVIDER_MODEL = re.compile(r"^\S{1,256}$")
PER_MILLION = 1_000_000


class LlmRouteError(ValueError):
    """The routes contradict each other (raised at start-up)."""


def validate_model_name(name: str) -> str:
    """Accept a virtual model name: lower-case letters, digits, inner `.` and `-`, 1-64 long.

    Raises:
        ValueError: another character, too long, or a doubled separator.
    """
    if not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name or "--" in name:
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 lower-case letters, digits and single inner '.' or '-'"
        )
    return name


def _validate_provider_model(model: str) -> str:
    if not _PROVIDER_MODEL.fullmatch(model):
        raise ValueError(f"invalid provider model id {model!r}: 1-256 characters, no whitespace")
    return model


ModelName = Annotated[str, AfterValidator(validate_model_name)]


class NoCredential(BaseModel):
    """No Authorization header upstream (a local model server)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none"] = "none"


class StaticCredential(NamedSecret):
    """A static API key (the named secret), sent as `Authorization: Bearer <key>`."""

    mode: Literal["static"]


class ClientCredentials(NamedSecret):
    """OAuth client credentials grant (RFC 6749 4.4) at `token_url`; the client secret is the named one."""

    mode: Literal["client_credentials"]
    token_url: Url
    client_id: str = Field(min_length=1, max_length=256)
    scope: str | None = None


Credential = Annotated[
    NoCredential | StaticCredential | ClientCredentials | UpstreamTokenExchange, Field(discriminator="mode")
]


@dataclass(frozen=True, slots=True)
class LlmTokenUpstream:
    """A route as the credentials stage sees it: a name that cannot meet an MCP server's or an A2A
    agent's (`llm:<route>`), the URL tokens are asked for (RFC 8707 resource, unless the credential
    names one; None: no resource is sent), the credential in the stage's terms."""

    name: str
    url: str | None
    credential: UpstreamStatic | UpstreamClientCredentials | UpstreamTokenExchange


class LlmRouteSpec(BaseModel):
    """One virtual model, as declared in the config file under `llm_routes`."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    # Which `LlmProvider` speaks to it; only OpenAI-compatible endpoints exist so far.
    provider: Literal["openai"] = "openai"
    base_url: Url
    model: Annotated[str, AfterValidator(_validate_provider_model)]
    credential: Credential = Field(default_factory=NoCredential)
    # Per million tokens; see the module docstring.
    input_price: float = Field(default=0.0, ge=0, le=1_000_000)
    output_price: float = Field(default=0.0, ge=0, le=1_000_000)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Output tokens reserved from a budget when the request names no max_tokens.
    default_max_tokens: int = Field(default=1024, ge=1, le=10_000_000)
    fallbacks: list[ModelName] = Field(default_factory=list)
    enabled: bool = True
    limits: UpstreamLimits = Field(default_factory=UpstreamLimits)

    def token_upstream(self) -> LlmTokenUpstream | None:
        """What the credentials stage serves this route from; None when it sends no credential."""
        credential = self.credential
        name = f"llm:{self.name}"
        if isinstance(credential, NoCredential):
            return None
        if isinstance(credential, StaticCredential):
            return LlmTokenUpstream(
                name, self.base_url, UpstreamStatic(mode="static", secret=credential.secret)
            )
        if isinstance(credential, ClientCredentials):
            # The route's own shape of the grant: the client's secret in HTTP Basic, the scope as
            # given, and no `resource` (token services such as Entra ID v2 refuse one).
            cc = UpstreamClientCredentials(
                mode="client_credentials",
                token_url=credential.token_url,
                client=ClientAuth(secret=credential.secret, client_id=credential.client_id),
                scopes=credential.scope.split() if credential.scope else [],
            )
            return LlmTokenUpstream(name, None, cc)
        return LlmTokenUpstream(name, self.base_url, credential)

    @model_validator(mode="after")
    def _fallbacks(self) -> LlmRouteSpec:
        if self.name in self.fallbacks:
            raise ValueError(f"route {self.name!r} cannot be its own fallback")
        if len(set(self.fallbacks)) != len(self.fallbacks):
            raise ValueError(f"route {self.name!r} names a fallback twice")
        return self


def check_routes(specs: list[LlmRouteSpec]) -> list[LlmRouteSpec]:
    """Cross-route checks: unique names, and every fallback names a declared route.

    Raises:
        ValueError: a duplicate name or a fallback to an undeclared route.
    """
    names: set[str] = set()
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"llm route {spec.name!r} is declared twice")
        names.add(spec.name)
    for spec in specs:
        for fallback in spec.fallbacks:
            if fallback not in names:
                raise ValueError(f"llm route {spec.name!r} falls back to undeclared route {fallback!r}")
    return specs


def route_secrets(spec: LlmRouteSpec) -> list[tuple[str, str | None]]:
    """The secrets a route names, each with where it is sent (the provider, or a token endpoint; None
    for the built-in authorization server)."""
    upstream = spec.token_upstream()
    return credential_secrets(upstream.credential, spec.base_url) if upstream is not None else []


def token_upstreams(specs: Iterable[LlmRouteSpec]) -> dict[str, LlmTokenUpstream]:
    """The enabled routes that send a credential, by route name: the credentials stage's lookup."""
    return {s.name: u for s in specs if s.enabled and (u := s.token_upstream()) is not None}


# The settings field type: each spec validated, then the list as a whole.
LlmRouteList = Annotated[list[LlmRouteSpec], AfterValidator(check_routes)]


@dataclass(frozen=True, slots=True)
class LlmRoute:
    """A route ready to serve (its credential comes from the credentials stage)."""

    spec: LlmRouteSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """What `input_tokens` in and `output_tokens` out cost at this route's prices."""
        return (input_tokens * self.spec.input_price + output_tokens * self.spec.output_price) / PER_MILLION


class LlmRoutes:
    """The routes by virtual model name; disabled routes are invisible (as if undeclared)."""

    def __init__(self, routes: Iterable[LlmRoute]) -> None:
        self._routes = {r.name: r for r in routes}

    @classmethod
    def load(cls, specs: Sequence[LlmRouteSpec]) -> LlmRoutes:
        """Validate `specs` together and keep the enabled ones.

        Raises:
            LlmRouteError: the routes contradict each other.
        """
        try:
            check_routes(list(specs))
        except ValueError as exc:
            raise LlmRouteError(str(exc)) from exc
        return cls(LlmRoute(spec) for spec in specs if spec.enabled)

    def get(self, name: str) -> LlmRoute | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return list(self._routes)

    def chain(self, name: str) -> list[LlmRoute]:
        """The route `name` then its enabled fallbacks, in order; empty if `name` is unknown or disabled."""
        first = self._routes.get(name)
        if first is None:
            return []
        rest = (self._routes.get(f) for f in first.spec.fallbacks)
        return [first, *(r for r in rest if r is not None)]
