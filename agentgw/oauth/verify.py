"""The resource server's token checks: a bearer credential meant for an endpoint, to a `Principal`.

A bearer credential is either an API key (`agk_...`) or a JWT access token from a trusted issuer,
checked locally: signature against the issuer's keys, an asymmetric-only algorithm allow-list, `iss`,
`exp`/`nbf`/`iat` with a small leeway, and an audience that is the canonical URI of the endpoint
called (or a parent of it) (RFC 8707). A verified token is cached until it expires; the audience is
still checked on every call. The `Authenticate` stage and the built-in authorization server both use
these checks, so they live here, below both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import jwt

from agentgw.call import Principal
from agentgw.errors import Unauthenticated
from agentgw.oauth.apikeys import KEY_PREFIX, role_names
from agentgw.oauth.config import ALLOWED_ALGORITHMS
from agentgw.oauth.jwks import KeySet

__all__ = [
    "BearerVerifier",
    "JwtVerifier",
    "TokenVerifier",
    "TrustedIssuer",
    "audience_covers",
    "canonical_uri",
    "principal_from_claims",
]

MAX_CACHED_TOKENS = 10_000
# Per cached token: how many endpoints' audience checks are remembered (the URL parsing is per call).
MAX_ACCEPTED_RESOURCES = 32
# Which key type each algorithm family must be verified with (no key confusion across families).
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class TokenVerifier(Protocol):
    """Checks a bearer credential meant for `resource`; returns the principal or raises `Unauthenticated`."""

    async def verify(self, credential: str, resource: str) -> Principal: ...


def canonical_uri(uri: str) -> str:
    """RFC 8707 canonical form: lower-case scheme and host, no fragment, no trailing slash."""
    parts = urlsplit(uri)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def audience_covers(audience: str, resource: str) -> bool:
    """True if a token for `audience` may be used at `resource`: the same URI, or a path parent of it.

    `http://gw/mcp` covers `http://gw/mcp/github` but not `http://gw/mcpx`; both are canonicalised.
    """
    aud, res = canonical_uri(audience), canonical_uri(resource)
    if not urlsplit(aud).scheme or urlsplit(aud).query:
        return aud == res
    return res == aud or res.startswith(aud + "/")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):  # `realm_access.roles` reaches into nested claims
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def principal_from_claims(claims: Mapping[str, Any], role_claims: Sequence[str]) -> Principal:
    """The principal a verified token stands for.

    `sub` becomes `client:<sub>` when it is the token's own client (client credentials), else
    `user:<sub>`; roles come from the first of `role_claims` present, as `role:<name>`; scopes from
    `scope` or `scp`; actors from the `act` chain, outermost (current) first, as `client:<sub>`.

    Raises:
        Unauthenticated: no usable `sub`, or malformed roles, scopes or `act`.
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise Unauthenticated("the token has no usable sub claim")
    client_id = next(
        (v for k in ("client_id", "azp", "cid") if isinstance(v := claims.get(k), str) and v), None
    )
    subject = f"client:{sub}" if sub == client_id else f"user:{sub}"
    roles: tuple[str, ...] = ()
    for name in role_claims:
        value = _claim(claims, name)
        if value is not None:
            try:
                roles = role_names(_strings(value))
            except ValueError as exc:
                raise Unauthenticated(f"the token's {name} claim holds an invalid role name") from exc
            break
    scopes = frozenset(_strings(claims.get("scope")) or _strings(claims.get("scp")))
    actors: list[str] = []
    act = claims.get("act")
    while act is not None:
        if not isinstance(act, Mapping) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise Unauthenticated("the token's act claim is malformed")
        actors.append(f"client:{act['sub']}")
        act = act.get("act")
        if len(actors) > 16:
            raise Unauthenticated("the token's delegation chain is too long")
    return Principal(subject=subject, client_id=client_id, roles=roles, scopes=scopes, actors=tuple(actors))


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An issuer whose tokens are accepted, and how to read them."""

    issuer: str
    keys: KeySet
    algorithms: frozenset[str] = frozenset({"RS256"})
    audiences: frozenset[str] = frozenset()
    role_claims: tuple[str, ...] = ("roles", "groups")


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    claims: Mapping[str, Any]
    audiences: tuple[str, ...]
    extra_audiences: frozenset[str]
    expires_at: float
    # Resources the audience check already accepted for this token (a few gateway endpoints).
    accepted: set[str] = field(default_factory=set)


@dataclass(slots=True)
class JwtVerifier:
    """Verifies JWT access tokens from several trusted issuers, locally, with a cache until `exp`."""

    issuers: Sequence[TrustedIssuer]
    leeway_s: int = 30
    clock: Callable[[], float] = time.time
    _cache: dict[str, _Verified] = field(default_factory=dict)

    async def verify(self, credential: str, resource: str) -> Principal:
        """The principal behind a JWT meant for `resource`.

        Raises:
            Unauthenticated: malformed, forged, expired, not yet valid, from an untrusted issuer,
                or for another audience.
            Unavailable: the issuer's keys cannot be fetched at all.
        """
        verified = await self._verified(credential)
        if resource in verified.accepted:
            return verified.principal
        if not any(a in verified.extra_audiences or audience_covers(a, resource) for a in verified.audiences):
            # Audiences are not secret to the token's holder; naming both tells the caller the fix.
            raise Unauthenticated(
                f"the token is not meant for {resource} (its audience: {' '.join(verified.audiences)}); "
                f"expected audience: {resource} or a parent of it (RFC 8707 resource)"
            )
        if len(verified.accepted) < MAX_ACCEPTED_RESOURCES:
            verified.accepted.add(resource)
        return verified.principal

    async def inspect(self, credential: str) -> tuple[Principal, Mapping[str, Any]]:
        """The principal and claims of a valid token, whatever its audience (for token exchange).

        Raises:
            Unauthenticated: malformed, forged, expired, not yet valid, or from an untrusted issuer.
            Unavailable: the issuer's keys cannot be fetched at all.
        """
        verified = await self._verified(credential)
        return verified.principal, verified.claims

    async def _verified(self, credential: str) -> _Verified:
        verified = self._cache.get(credential)
        if verified is None:
            verified = await self._verify(credential)
            if len(self._cache) >= MAX_CACHED_TOKENS:
                self._evict()
            self._cache[credential] = verified
        elif self.clock() > verified.expires_at + self.leeway_s:
            del self._cache[credential]
            raise Unauthenticated("the token has expired")
        return verified

    def _evict(self) -> None:
        now = self.clock()
        for token in [t for t, v in self._cache.items() if v.expires_at + self.leeway_s < now]:
            del self._cache[token]
        while len(self._cache) >= MAX_CACHED_TOKENS:  # still full of live tokens: drop the oldest
            del self._cache[next(iter(self._cache))]

    async def _verify(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is not a well-formed JWT") from exc
        alg = header.get("alg")
        iss = unverified.get("iss")
        trusted = next((i for i in self.issuers if i.issuer == iss), None)
        if trusted is None:
            raise Unauthenticated("the token's issuer is not trusted")
        if not isinstance(alg, str) or alg not in trusted.algorithms or alg not in ALLOWED_ALGORITHMS:
            raise Unauthenticated("the token's signing algorithm is not accepted")
        kid = header.get("kid")
        jwk = await trusted.keys.key(kid if isinstance(kid, str) else None)
        if jwk is None:
            raise Unauthenticated("the token is signed with an unknown key")
        if not _key_fits(jwk, alg):
            raise Unauthenticated("the token's algorithm does not fit its key")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=trusted.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("the token is not valid yet") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token's signature or claims are invalid") from exc
        aud = claims.get("aud")
        audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
        if not audiences:
            raise Unauthenticated("the token has no audience")
        principal = principal_from_claims(claims, trusted.role_claims)
        return _Verified(
            replace(principal, credential=token),
            claims,
            audiences,
            trusted.audiences,
            float(claims["exp"]),
        )


def _key_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    if jwk.get("kty") != _KEY_TYPES.get(alg[:2]):
        return False
    if "alg" in jwk and jwk["alg"] != alg:
        return False
    if jwk.get("use", "sig") != "sig":
        return False
    return alg not in _EC_CURVES or jwk.get("crv") == _EC_CURVES[alg]


class BearerVerifier:
    """Routes a bearer credential by its shape: API keys to `api_keys`, everything else to `jwt`."""

    def __init__(self, jwt_verifier: TokenVerifier | None, api_keys: TokenVerifier | None) -> None:
        self._jwt = jwt_verifier
        self._api_keys = api_keys

    async def verify(self, credential: str, resource: str) -> Principal:
        """The principal of `credential`.

        Raises:
            Unauthenticated: the credential kind is not enabled, or its verifier refused it.
        """
        verifier = self._api_keys if credential.startswith(KEY_PREFIX) else self._jwt
        if verifier is None:
            raise Unauthenticated("this kind of credential is not accepted by this gateway")
        return await verifier.verify(credential, resource)
