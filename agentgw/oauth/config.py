"""The `auth` section of the settings: trusted issuers, the built-in authorization server, API keys.

Plain pydantic models with no imports from the rest of the gateway, so `agentgw/settings.py` can
embed them without an import cycle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ApiKeySettings",
    "AuthSettings",
    "BuiltinAuthServer",
    "BuiltinClient",
    "BuiltinUser",
    "ExchangePermission",
    "IdentityProviderSettings",
    "IssuerSettings",
    "RegistrationSettings",
]

# Asymmetric algorithms only: `none` and the HS* family are never accepted, whatever the config says
# (an HS* token verified with a public key is the classic key-confusion forgery).
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment or parts.query:
        raise ValueError(f"invalid URL {url!r}: an absolute http(s) URL without query or fragment")
    return url


class IssuerSettings(BaseModel):
    """An external identity provider whose JWT access tokens the gateway accepts."""

    model_config = ConfigDict(extra="forbid")

    issuer: str
    # Default: discovered from the issuer's RFC 8414 / OpenID metadata document.
    jwks_uri: str | None = None
    # Audiences accepted besides the endpoint's canonical URI (for IdPs that cannot do RFC 8707).
    audiences: list[str] = Field(default_factory=list)
    # Claims whose values become roles (`role:<value>`); the first claim present wins.
    role_claims: list[str] = Field(default_factory=lambda: ["roles", "groups"])
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"])

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("jwks_uri")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - ALLOWED_ALGORITHMS)
        if bad or not value:
            raise ValueError(f"algorithms {bad or value} are not allowed: use {sorted(ALLOWED_ALGORITHMS)}")
        return value


class ExchangePermission(BaseModel):
    """What a client may get from the built-in server beyond tokens for the gateway itself."""

    model_config = ConfigDict(extra="forbid")

    # Resources (RFC 8707) / audiences outside the gateway this client may request tokens for, by
    # token exchange or client credentials: typically the URLs of upstreams (exact match).
    audiences: list[str] = Field(default_factory=list)
    # Scopes an exchanged token may carry although the subject token lacks them (default: none, an
    # exchange only narrows).
    scopes: list[str] = Field(default_factory=list)


class BuiltinClient(BaseModel):
    """A client pre-registered with the built-in authorization server."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._~-]+$")
    # sha256 hex of the secret (`agentgw keys hash-secret`); none = a public client (PKCE only).
    client_secret_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    redirect_uris: list[str] = Field(default_factory=list)
    grant_types: list[str] = Field(default_factory=lambda: ["authorization_code"])
    # Scopes this client may ask for; empty = any scope the gateway knows.
    scopes: list[str] = Field(default_factory=list)
    # Roles carried by client_credentials tokens of this client.
    roles: list[str] = Field(default_factory=list)
    # Token exchange and client credentials for upstreams (docs/decisions/0601).
    exchange: ExchangePermission = Field(default_factory=ExchangePermission)
    # Shown on the login page ("<client_name> asks to act for you"); default: the client id.
    client_name: str | None = Field(default=None, max_length=100)


class BuiltinUser(BaseModel):
    """A person who can log in at the built-in authorization server's authorization endpoint."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._@-]+$")
    # `scrypt$<salt hex>$<hash hex>` from `agentgw keys hash-password`.
    password_hash: str
    roles: list[str] = Field(default_factory=list)


class RegistrationSettings(BaseModel):
    """RFC 7591 dynamic client registration at `/oauth/register` (public clients only)."""

    model_config = ConfigDict(extra="forbid")

    # open: anyone may register; token: a bearer initial access token from
    # `initial_access_tokens_sha256` is required; off: no registration endpoint.
    mode: Literal["open", "token", "off"] = "open"
    # sha256 hex of each accepted initial access token (`agentgw keys hash-secret`).
    initial_access_tokens_sha256: list[str] = Field(default_factory=list)
    # Registered clients not revoked, across every node (the database counts them).
    max_clients: int = Field(default=1000, ge=0)
    # Registrations per source address per minute, per node.
    per_address_per_minute: int = Field(default=10, ge=1)

    @field_validator("initial_access_tokens_sha256")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        if any(not re.fullmatch(r"[0-9a-f]{64}", v) for v in value):
            raise ValueError("initial access tokens are given as sha256 hex (`agentgw keys hash-secret`)")
        return value


class IdentityProviderSettings(BaseModel):
    """An OpenID Connect provider the built-in server sends users to for their login (authorization
    code + PKCE); its verified ID token's claims become the gateway user (docs/decisions/0110)."""

    model_config = ConfigDict(extra="forbid")

    issuer: str
    client_id: str = Field(min_length=1, max_length=200)
    # A named secret (`secrets:`) with the client secret; none = a public client (PKCE only).
    client_secret: str | None = None
    # What the login page's button says: "Sign in with <display_name>".
    display_name: str = Field(default="your organisation", min_length=1, max_length=100)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    # The ID token claim that names the user (`user:<value>` in the policy); `sub` is stable, `email`
    # or `preferred_username` read better in policies and the audit log.
    name_claim: str = "sub"
    # The ID token claim holding the user's groups (dotted for nested claims, `realm_access.roles`).
    groups_claim: str = "groups"
    # Group -> roles. Empty: each group is a role of the same name.
    role_map: dict[str, list[str]] = Field(default_factory=dict)
    # mapped: only users with at least one role from their groups may log in; any: every user the
    # provider signs in (the policy then decides what they see).
    allow: Literal["mapped", "any"] = "mapped"
    # A login through the provider refreshes for at most this long; then the user signs in there again.
    session_max_s: int = Field(default=12 * 3600, gt=0)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"])

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("scopes must include openid")
        return value

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - ALLOWED_ALGORITHMS)
        if bad or not value:
            raise ValueError(f"algorithms {bad or value} are not allowed: use {sorted(ALLOWED_ALGORITHMS)}")
        return value


class BuiltinAuthServer(BaseModel):
    """The embedded authorization server; its issuer is the gateway's base URL."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # JSON file of signing keys; default `oauth-keys.json` in the data directory (`data_dir`).
    signing_key: Path | None = None
    token_ttl_s: int = Field(default=3600, gt=0, le=86400)
    # A refresh token (issued with every authorization-code login) is good this long unused; each use
    # rotates it. A login's tokens all end `refresh_max_s` after the login, used or not.
    refresh_ttl_s: int = Field(default=14 * 86400, gt=0)
    refresh_max_s: int = Field(default=90 * 86400, gt=0)
    # The current signing key is replaced when older than this; old keys stay in the JWKS a while.
    rotate_after_s: int = Field(default=30 * 86400, gt=0)
    clients: list[BuiltinClient] = Field(default_factory=list)
    users: list[BuiltinUser] = Field(default_factory=list)
    # Accept https client ids that point at a Client ID Metadata Document.
    client_id_metadata_documents: bool = True
    registration: RegistrationSettings = Field(default_factory=RegistrationSettings)
    # Users log in at this OpenID Connect provider, beside `users` (or instead, when there are none).
    identity_provider: IdentityProviderSettings | None = None


class ApiKeySettings(BaseModel):
    """Service-account API keys (`agk_...` bearer tokens), stored hashed in the database."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # How long a verified key is trusted without asking the database again (revocation delay on
    # other nodes; the node that revokes forgets at once).
    cache_s: float = Field(default=10.0, ge=0)


class AuthSettings(BaseModel):
    """Who may present what credentials."""

    model_config = ConfigDict(extra="forbid")

    issuers: list[IssuerSettings] = Field(default_factory=list)
    builtin: BuiltinAuthServer = Field(default_factory=BuiltinAuthServer)
    api_keys: ApiKeySettings = Field(default_factory=ApiKeySettings)
    # Clock skew tolerated on exp/nbf/iat.
    leeway_s: int = Field(default=30, ge=0, le=300)
    # An unknown `kid` refetches an issuer's JWKS at most this often (a forged kid cannot DoS the IdP).
    jwks_min_refresh_s: float = Field(default=30.0, ge=0)
    # A JWKS is refetched after this long even when every kid is known (rotation at the IdP).
    jwks_max_age_s: float = Field(default=3600.0, gt=0)
