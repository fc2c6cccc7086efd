"""What an upstream is: validated specs (config file, admin API, CLI) and their SQL table.

Names become part of policy objects (`mcp:<server>/<tool>`) and of namespaced tool names, so the
charset is narrow on purpose: no `/`, `*`, `.`, `:` or whitespace can widen a pattern or fake a
separator.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.config import JsonDict
from sqlalchemy import JSON, Column
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

__all__ = [
    "LOCATION_REFUSED",
    "NAME_PATTERN",
    "NAME_REGEX",
    "NAME_SCHEMA",
    "PER_CALLER_MODES",
    "ClientAuth",
    "McpServerRow",
    "McpServerSpec",
    "NamedSecret",
    "Transport",
    "UpstreamClientCredentials",
    "UpstreamCredential",
    "UpstreamIdJag",
    "UpstreamLimits",
    "UpstreamNone",
    "UpstreamStatic",
    "UpstreamTokenExchange",
    "VirtualServerRow",
    "VirtualServerSpec",
    "credential_secrets",
    "validate_name",
]

NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# The same names, `--` excluded, as one pattern (no look-ahead) for the OpenAPI document and FastAPI.
NAME_REGEX = r"^[a-z0-9](?:-?[a-z0-9])*$"
NAME_SCHEMA: JsonDict = {"type": "string", "pattern": NAME_REGEX, "maxLength": 63}
Transport = Literal["streamable-http", "sse", "stdio"]


def validate_name(name: str) -> str:
    """Accept a registry name: lower-case ASCII letters, digits and inner single hyphens, 1-63 long.

    Raises:
        ValueError: the name has another character, is too long, or has `--` (a separator look-alike).
    """
    if not NAME_PATTERN.fullmatch(name) or "--" in name:
        raise ValueError(
            f"invalid name {name!r}: use 1-63 lower-case letters, digits and single inner hyphens"
        )
    return name


def _validate_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid url {url!r}: an absolute http(s) URL is required")
    if parts.username or parts.password:
        raise ValueError("invalid url: credentials in the URL are not allowed; use a credential mode")
    if parts.fragment:
        raise ValueError("invalid url: a fragment has no meaning for an upstream")
    return url


Name = Annotated[str, AfterValidator(validate_name), WithJsonSchema(NAME_SCHEMA)]
# What `_validate_url` takes, as far as a client needs to know: an absolute http(s) URL, no user or
# fragment (the host kept to ASCII: `urlsplit` refuses some other host characters).
URL_SCHEMA = {"type": "string", "pattern": r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?][^#\s]*)?$"}
Url = Annotated[str, AfterValidator(_validate_url), WithJsonSchema(URL_SCHEMA)]

# --- upstream credentials (docs/decisions/0600, 0700) ---------------------------------------------
# A spec names a secret declared in the config file (`secrets:`, registry/secrets.py), never the secret
# nor where it lives: specs are stored in the database, logged and returned by the admin API, and
# whoever may write one must not choose which file or variable the gateway reads.

_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 3.3 scope-token


def _validate_scopes(scopes: list[str]) -> list[str]:
    for scope in scopes:
        if not _SCOPE.fullmatch(scope):
            raise ValueError(f"invalid scope {scope!r}: one scope token per list item, no spaces or quotes")
    return scopes


Scopes = Annotated[list[str], AfterValidator(_validate_scopes)]
TokenType = Literal["access_token", "jwt", "id_token"]
LOCATION_REFUSED = (
    "a credential names a secret declared under `secrets:` in the config file (`secret: <name>`), "
    "never an environment variable or a file"
)


class NamedSecret(BaseModel):
    """`secret`: the name of a secret declared in the config file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    secret: Name

    @model_validator(mode="before")
    @classmethod
    def _named_not_located(cls, data: object) -> object:
        if isinstance(data, dict) and ("env" in data or "file" in data):
            raise ValueError(LOCATION_REFUSED)
        return data


class ClientAuth(NamedSecret):
    """How the gateway authenticates itself at a token endpoint, as an OAuth client.

    `client_secret_basic` / `client_secret_post` (RFC 6749 2.3.1): the secret is the client secret.
    `private_key_jwt` (RFC 7523 2.2): the secret is a PEM private key that signs a short assertion.
    """

    client_id: str = Field(min_length=1, max_length=256)
    method: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] = "client_secret_basic"
    # For private_key_jwt: the `kid` header the token endpoint finds the public key by, and the algorithm.
    key_id: str | None = Field(default=None, max_length=256)
    algorithm: Literal["RS256", "PS256", "ES256", "EdDSA"] = "RS256"


class UpstreamNone(BaseModel):
    """No Authorization header upstream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["none"] = "none"


class UpstreamStatic(NamedSecret):
    """A fixed secret (an API key), sent as `Authorization: Bearer <secret>`."""

    mode: Literal["static"]


class _TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # RFC 8707 resource the token is for; default: the upstream's URL.
    resource: Url | None = None
    # RFC 8693 audience (a logical name some token services want instead of, or besides, a resource).
    audience: str | None = Field(default=None, min_length=1, max_length=1000)
    # Scopes asked for on every call to this upstream.
    scopes: Scopes = Field(default_factory=list)
    # How long to wait for a token endpoint before the call fails.
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class UpstreamClientCredentials(_TokenRequest):
    """The gateway's own identity: the client credentials grant (RFC 6749 4.4).

    `token_url` unset: the built-in authorization server (its client needs `exchange.audiences`
    naming the upstream).
    """

    mode: Literal["client_credentials"]
    token_url: Url | None = None
    client: ClientAuth


class UpstreamTokenExchange(_TokenRequest):
    """RFC 8693: the caller's token is exchanged for one meant for this upstream, naming the gateway as
    the actor. `token_url` unset: the built-in authorization server."""

    mode: Literal["token_exchange"]
    token_url: Url | None = None
    client: ClientAuth
    # Extra scopes per tool (`<tool name>: [scopes]`), added to `scopes` for calls of that tool.
    tool_scopes: dict[str, Scopes] = Field(default_factory=dict)
    subject_token_type: TokenType = "access_token"  # noqa: S105  (a token type, not a secret)
    requested_token_type: Literal["access_token", "jwt"] = "access_token"  # noqa: S105
    # Send the gateway's own token (client credentials at the same endpoint) as the actor_token, so the
    # issued token's `act` names the gateway; off for services that name the authenticated client.
    actor_token: bool = True


class UpstreamIdJag(_TokenRequest):
    """MCP enterprise-managed authorization: an RFC 8693 exchange at the IdP for an ID-JAG meant for
    the upstream's authorization server, then the RFC 7523 jwt-bearer grant there."""

    mode: Literal["id_jag"]
    idp_token_url: Url
    idp_client: ClientAuth
    # The upstream's authorization server: its issuer (the ID-JAG's audience) and token endpoint.
    authorization_server: str = Field(min_length=1, max_length=1000)
    token_url: Url
    client: ClientAuth
    tool_scopes: dict[str, Scopes] = Field(default_factory=dict)
    subject_token_type: TokenType = "access_token"  # noqa: S105  (a token type, not a secret)


UpstreamCredential = Annotated[
    UpstreamNone | UpstreamStatic | UpstreamClientCredentials | UpstreamTokenExchange | UpstreamIdJag,
    Field(discriminator="mode"),
]


def credential_secrets(credential: UpstreamCredential, url: str | None) -> list[tuple[str, str | None]]:
    """The secrets `credential` names, each with where it is sent: `url` (the upstream's, for a static
    secret) or a token endpoint; None for the built-in authorization server (never leaves the process)."""
    if isinstance(credential, UpstreamStatic):
        return [(credential.secret, url)]
    if isinstance(credential, UpstreamClientCredentials | UpstreamTokenExchange):
        return [(credential.client.secret, credential.token_url)]
    if isinstance(credential, UpstreamIdJag):
        return [
            (credential.idp_client.secret, credential.idp_token_url),
            (credential.client.secret, credential.token_url),
        ]
    return []


# Modes whose token stands for the caller: one per caller, so never on a session shared by callers.
PER_CALLER_MODES = frozenset({"token_exchange", "id_jag"})

_NO_COMMAND: JsonDict = {"command": {"type": ["string", "null"], "maxLength": 0}, "args": {"maxItems": 0}}
# What `McpServerSpec._transport_fields` checks, for the OpenAPI document: clients see which fields go
# with which transport instead of finding out from a 422.
TRANSPORT_FIELDS: JsonDict = {
    "anyOf": [
        {
            "properties": {
                "transport": {"const": "stdio"},
                "command": {"type": "string", "minLength": 1},
                "url": {"type": "null"},
                "credential": {"properties": {"mode": {"const": "none"}}},
            },
            "required": ["transport", "command"],
        },
        {
            "properties": {
                "transport": {"const": "sse"},
                "url": {"type": "string"},
                **_NO_COMMAND,
                "credential": {"properties": {"mode": {"not": {"enum": [*sorted(PER_CALLER_MODES)]}}}},
            },
            "required": ["transport", "url"],
        },
        {
            "properties": {
                "transport": {"const": "streamable-http"},
                "url": {"type": "string"},
                **_NO_COMMAND,
            },
            "required": ["url"],
        },
    ]
}


class UpstreamLimits(BaseModel):
    """How much of the gateway one upstream may hold. A field left unset takes the gateway-wide value
    (`upstream_limits` in the settings), and that one the built-in default."""

    model_config = ConfigDict(extra="forbid")

    # Requests in flight whose answers are read whole or are short; a call finds one of these even
    # while the upstream's streams are all open.
    max_connections: int | None = Field(default=None, ge=1, le=100_000)
    # Streamed answers (SSE) open at once, counted apart from the calls above.
    max_streams: int | None = Field(default=None, ge=1, le=100_000)
    # How long a call waits for a free connection before it is refused as "upstream busy".
    connect_wait_s: float | None = Field(default=None, ge=0, le=60)
    # The largest answer the gateway reads whole (and the largest single SSE event it relays).
    max_answer_bytes: int | None = Field(default=None, ge=1024, le=1024**3)


class McpServerSpec(BaseModel):
    """An upstream MCP server as declared in the config file or through the admin API."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=TRANSPORT_FIELDS)

    name: Name
    transport: Transport = "streamable-http"
    url: Url | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    enabled: bool = True
    # Scopes a token must carry to use this server at all (published in the resource metadata).
    scopes: list[str] = Field(default_factory=list)
    # What the gateway sends upstream as Authorization; never the caller's token (docs/decisions/0600).
    credential: UpstreamCredential = Field(default_factory=UpstreamNone)
    limits: UpstreamLimits = Field(default_factory=UpstreamLimits)
    # What the registry API publishes about the server (server.json `title`, `description`, `version`).
    title: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = Field(default=None, min_length=1, max_length=100)
    version: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^\s^~<>=*/]+$")
    # Tool pinning against rug pulls (agentgw/registry/pins.py); unset: the gateway's `registry.pinning`.
    pinning: Literal["off", "first-sight", "approve"] | None = None

    @property
    def per_caller_credential(self) -> bool:
        """The upstream gets a token per caller (token exchange, ID-JAG): served by pass-through only."""
        return self.credential.mode in PER_CALLER_MODES

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerSpec:
        if self.version == "latest":
            raise ValueError("version: `latest` names the newest version in the registry API; use a real one")
        if self.transport == "stdio" and self.credential.mode != "none":
            raise ValueError("a stdio server has no Authorization header: its credential mode must be none")
        if self.transport != "streamable-http" and self.per_caller_credential:
            raise ValueError(
                f"credential mode {self.credential.mode} needs transport streamable-http: per-caller tokens "
                "cannot ride a connection shared by every caller"
            )
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("a stdio server needs a command")
            if self.url:
                raise ValueError("a stdio server takes a command, not a url")
        else:
            if not self.url:
                raise ValueError(f"a {self.transport} server needs a url")
            if self.command or self.args:
                raise ValueError(f"a {self.transport} server takes a url, not a command")
        return self


# `<server>/<name>` or `<server>/*`, as `VirtualServerSpec._selectors` checks it, for the document.
Selector = Annotated[
    str, WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9](?:-?[a-z0-9]){0,62}/[\s\S]"})
]


class VirtualServerSpec(BaseModel):
    """A named selection of tools, prompts and resources from several upstreams, served at its own URL.

    Each selector is `<server>/<name>` or `<server>/*`; kinds are `tools`, `prompts`, `resources`.
    With `prefix: false` names are served unchanged (MCP Apps break on renamed tools); the registry
    then refuses selections whose names collide.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    tools: list[Selector] = Field(default_factory=list)
    prompts: list[Selector] = Field(default_factory=list)
    resources: list[Selector] = Field(default_factory=list)
    prefix: bool = True

    def servers(self) -> set[str]:
        """The names of the servers this virtual server selects from."""
        return {selector.partition("/")[0] for selector in (*self.tools, *self.prompts, *self.resources)}

    @model_validator(mode="after")
    def _selectors(self) -> VirtualServerSpec:
        for selector in (*self.tools, *self.prompts, *self.resources):
            server, sep, item = selector.partition("/")
            validate_name(server)
            if not sep or not item:
                raise ValueError(f"invalid selector {selector!r}: use <server>/<name> or <server>/*")
        return self


class McpServerRow(SQLModel, table=True):
    """The stored form of an `McpServerSpec`; `source` says whether the config file owns it."""

    __tablename__ = "mcp_server"

    name: str = SQLField(primary_key=True)
    spec: dict[str, object] = SQLField(sa_column=Column(JSON, nullable=False))
    source: str = "api"


class VirtualServerRow(SQLModel, table=True):
    """The stored form of a `VirtualServerSpec`."""

    __tablename__ = "virtual_server"

    name: str = SQLField(primary_key=True)
    spec: dict[str, object] = SQLField(sa_column=Column(JSON, nullable=False))
    source: str = "api"
