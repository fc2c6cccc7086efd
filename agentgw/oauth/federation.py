"""Login at the organisation's OpenID Connect provider, for the built-in authorization server.

The built-in server keeps the client-facing side (registration, PKCE, codes, its own tokens); only
the user's sign-in moves to the provider. `begin` remembers the client's authorization request under
a fresh `state` and sends the browser to the provider with its own PKCE verifier and `nonce`;
`finish` takes the provider's code back at `/oauth/callback`, redeems it, verifies the ID token
(signature by the provider's JWKS, issuer, audience, `azp`, expiry, nonce) and maps its claims to a
gateway user. Only the ID token is read: the provider's access and refresh tokens are dropped.

Pending sign-ins live in the database (agentgw/oauth/pending.py), as authorization codes do: a
sign-in started on one node finishes on whichever node the browser comes back to. Who signed in
through the provider, with which roles and when, is kept there too (`FederatedUsers`), so a refresh
on any node knows the user's roles and when the sign-in must be repeated (`session_max_s`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import anyio.to_thread
import httpx
import jwt
from sqlalchemy import JSON, Column, Engine, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col

from agentgw.oauth.apikeys import ROLE
from agentgw.oauth.config import IdentityProviderSettings
from agentgw.oauth.jwks import RemoteKeySet
from agentgw.oauth.pending import Pending, PendingLogins
from agentgw.oauth.verify import _key_fits

__all__ = [
    "FederatedUser",
    "FederatedUsers",
    "FederationError",
    "OidcLogin",
    "Pending",
]

log = logging.getLogger(__name__)

PENDING_TTL_S = 600
FETCH_TIMEOUT_S = 5.0
METADATA_TTL_S = 3600
MAX_GROUPS = 200
MAX_CODE = 4096  # the provider's authorization code, passed back to it: bounded before it is sent
# Names become policy subjects (`user:<name>`) and audit fields: no spaces, commas or controls.
NAME = re.compile(r"^[A-Za-z0-9._@+|:_-]{1,200}$")


class FederationError(Exception):
    """A login at the provider that cannot complete; `message` is safe to show the user.

    `status` is the HTTP status of the page: 400 for a request that is not (or no longer) valid,
    403 for a user the gateway refuses, 502 for a provider that is down or answers wrongly.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class FederatedUser:
    """Who the provider signed in, as the gateway sees them."""

    name: str
    roles: list[str]


class FederatedUserRow(SQLModel, table=True):
    __tablename__ = "oauth_federated_user"

    name: str = SQLField(primary_key=True)
    issuer: str
    roles: list[str] = SQLField(sa_column=Column(JSON, nullable=False))
    signed_in: datetime


class FederatedUsers:
    """Users who signed in at the provider: their roles then, and until when they may refresh."""

    def __init__(self, engine: Engine, *, issuer: str, session_max_s: int) -> None:
        self._engine = engine
        self._issuer = issuer
        self._max = timedelta(seconds=session_max_s)
        SQLModel.metadata.create_all(engine, tables=[FederatedUserRow.__table__])  # type: ignore[attr-defined]  # SQLModel tables are declared dynamically

    def signed_in(self, user: FederatedUser) -> None:
        """Record a sign-in (its roles, its time); the latest one counts."""
        now = datetime.now(UTC)
        values: dict[str, Any] = {"issuer": self._issuer, "roles": list(user.roles), "signed_in": now}
        with Session(self._engine) as session:
            changed = session.exec(
                update(FederatedUserRow).where(col(FederatedUserRow.name) == user.name).values(**values)
            )
            if changed.rowcount == 1:
                session.commit()
                return
            session.add(
                FederatedUserRow(name=user.name, issuer=self._issuer, roles=list(user.roles), signed_in=now)
            )
            try:
                session.commit()
            except IntegrityError:  # another node recorded this user's first sign-in meanwhile
                session.rollback()
                session.exec(
                    update(FederatedUserRow).where(col(FederatedUserRow.name) == user.name).values(**values)
                )
                session.commit()

    def current(self, name: str) -> FederatedUser | None:
        """The user's roles from their latest sign-in, if that was at this provider and recent enough."""
        with Session(self._engine) as session:
            row = session.get(FederatedUserRow, name)
        if row is None or row.issuer != self._issuer:
            return None
        signed_in = row.signed_in if row.signed_in.tzinfo else row.signed_in.replace(tzinfo=UTC)
        if signed_in + self._max <= datetime.now(UTC):
            return None
        return FederatedUser(row.name, list(row.roles))


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _groups(claims: dict[str, Any], path: str) -> list[str]:
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list):
        return []
    return [g for g in value[:MAX_GROUPS] if isinstance(g, str) and 0 < len(g) <= 200]


class OidcLogin:
    """The provider, as the built-in server's login step."""

    def __init__(
        self,
        config: IdentityProviderSettings,
        *,
        redirect_uri: str,
        http: httpx.AsyncClient,
        pending: PendingLogins,
        client_secret: Any = None,
        leeway_s: int = 30,
        jwks_min_refresh_s: float = 30.0,
        jwks_max_age_s: float = 3600.0,
    ) -> None:
        self.config = config
        self.redirect_uri = redirect_uri
        self._http = http
        # A callable returning the secret (read when used, never kept in a field that is logged).
        self._client_secret = client_secret
        self._leeway = leeway_s
        self._keys = RemoteKeySet(
            config.issuer, None, http, min_refresh_s=jwks_min_refresh_s, max_age_s=jwks_max_age_s
        )
        self._metadata: dict[str, Any] | None = None
        self._metadata_until = 0.0
        self._pending = pending

    async def _discover(self) -> dict[str, Any]:
        """The provider's OpenID metadata (cached); its issuer must be the configured one.

        Raises:
            FederationError: the provider is down or its metadata is unusable (502).
        """
        if self._metadata is not None and time.monotonic() < self._metadata_until:
            return self._metadata
        url = f"{self.config.issuer.rstrip('/')}/.well-known/openid-configuration"
        try:
            response = await self._http.get(url, timeout=FETCH_TIMEOUT_S)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("identity provider unreachable issuer=%s error=%s", self.config.issuer, exc)
            raise FederationError(
                f"{self.config.display_name}'s sign-in cannot be reached; try again later", 502
            ) from exc
        endpoints = ("authorization_endpoint", "token_endpoint", "jwks_uri")
        if (
            not isinstance(document, dict)
            or document.get("issuer") != self.config.issuer
            or not all(
                isinstance(document.get(k), str) and document[k].startswith(("https://", "http://"))
                for k in endpoints
            )
        ):
            log.warning("identity provider metadata unusable issuer=%s", self.config.issuer)
            raise FederationError(f"{self.config.display_name}'s sign-in is misconfigured", 502)
        self._metadata, self._metadata_until = document, time.monotonic() + METADATA_TTL_S
        return document

    async def begin(self, params: dict[str, list[str]]) -> str:
        """Remember the client's request; the provider's authorization URL to send the browser to.

        Raises:
            FederationError: the provider cannot be reached (502), too many sign-ins are pending, or
                the database cannot keep this one (503).
        """
        metadata = await self._discover()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        client_id = (params.get("client_id") or [""])[0]
        store = self._pending
        try:
            kept = await anyio.to_thread.run_sync(
                lambda: store.save_sign_in(state, client_id, Pending(params, nonce, verifier), PENDING_TTL_S)
            )
        except SQLAlchemyError as exc:
            log.warning("pending sign-in not stored: database unavailable (%s)", type(exc).__name__)
            raise FederationError("sign-in is unavailable right now; try again shortly", 503) from exc
        if not kept:
            log.warning("pending sign-in refused: too many in progress client_id=%s", client_id[:200])
            raise FederationError("too many sign-ins are in progress; try again shortly", 503)
        query = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        }
        endpoint: str = metadata["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(query)}"

    async def take(self, state: str) -> Pending:
        """The pending request of `state`, once, whichever node began it.

        Raises:
            FederationError: no such sign-in, or it expired (400); the database cannot be reached (503).
        """
        store = self._pending
        try:
            pending = await anyio.to_thread.run_sync(store.take_sign_in, state)
        except SQLAlchemyError as exc:
            log.warning("pending sign-in not read: database unavailable (%s)", type(exc).__name__)
            raise FederationError("sign-in is unavailable right now; try again shortly", 503) from exc
        if pending is None:
            raise FederationError("this sign-in is unknown or has expired; start again from your application")
        return pending

    async def finish(self, pending: Pending, code: str) -> FederatedUser:
        """Redeem the provider's code and verify its ID token; the gateway user it stands for.

        Raises:
            FederationError: the provider refused or failed (502), the ID token is invalid (502), or
                the user may not use the gateway (403).
        """
        if not 0 < len(code) <= MAX_CODE:
            raise FederationError(
                f"{self.config.display_name} did not complete the sign-in; start again", 502
            )
        metadata = await self._discover()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": pending.verifier,
        }
        auth: httpx.Auth | httpx.BasicAuth | None = None
        if self._client_secret is not None:
            try:
                secret = self._client_secret()
            except ValueError as exc:  # the named secret is unset or unreadable now
                log.warning("identity provider client secret unavailable: %s", exc)
                raise FederationError(f"{self.config.display_name}'s sign-in is misconfigured", 502) from exc
            auth = httpx.BasicAuth(self.config.client_id, secret)
        else:
            form["client_id"] = self.config.client_id
        try:
            response = await self._http.post(
                metadata["token_endpoint"],
                data=form,
                auth=auth or httpx.USE_CLIENT_DEFAULT,
                timeout=FETCH_TIMEOUT_S,
                headers={"accept": "application/json"},
            )
            answer = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("identity provider token request failed issuer=%s error=%s", self.config.issuer, exc)
            raise FederationError(
                f"{self.config.display_name}'s sign-in cannot be reached; try again later", 502
            ) from exc
        if (
            response.status_code != 200
            or not isinstance(answer, dict)
            or not isinstance(answer.get("id_token"), str)
        ):
            error = answer.get("error") if isinstance(answer, dict) else None
            log.warning(
                "identity provider refused the code issuer=%s status=%s error=%s",
                self.config.issuer,
                response.status_code,
                str(error)[:100],
            )
            raise FederationError(
                f"{self.config.display_name} did not complete the sign-in; start again", 502
            )
        claims = await self.verify_id_token(answer["id_token"], pending.nonce)
        return self.user(claims)

    async def verify_id_token(self, token: str, nonce: str) -> dict[str, Any]:
        """The claims of an ID token from the provider for this client and this sign-in.

        Raises:
            FederationError: anything about it is wrong (502; the log says what).
        """

        def refuse(reason: str) -> FederationError:
            log.warning("ID token refused issuer=%s reason=%s", self.config.issuer, reason)
            return FederationError(f"{self.config.display_name}'s answer could not be verified", 502)

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise refuse("not a JWT") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise refuse(f"algorithm {str(alg)[:20]} not accepted")
        jwk = await self._keys.key(kid if isinstance(kid, str) else None)
        if jwk is None or not _key_fits(jwk, alg):
            raise refuse("unknown signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                jwt.PyJWK(jwk, algorithm=alg).key,
                algorithms=[alg],
                audience=self.config.client_id,
                issuer=self.config.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise refuse(f"invalid: {exc}") from exc
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.config.client_id:
            raise refuse("azp is not this client")
        presented = claims.get("nonce")
        if not isinstance(presented, str) or not hmac.compare_digest(presented, nonce):
            raise refuse("nonce does not match this sign-in")
        return claims

    def user(self, claims: dict[str, Any]) -> FederatedUser:
        """The gateway user for verified claims: the name claim, and roles from the groups.

        Raises:
            FederationError: no usable name, or (allow: mapped) no role for this user (403).
        """
        name = claims.get(self.config.name_claim)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            log.warning("identity provider user refused: claim %s unusable", self.config.name_claim)
            raise FederationError("your account at the identity provider has no usable user name", 403)
        groups = _groups(claims, self.config.groups_claim)
        if self.config.role_map:
            roles = {r for g in groups for r in self.config.role_map.get(g, [])}
        else:
            roles = {g for g in groups if ROLE.fullmatch(g.removeprefix("role:"))}
        if not roles and self.config.allow == "mapped":
            log.info("identity provider user refused: no mapped role user=%s", name)
            raise FederationError(f"{name} is not allowed to use this gateway", 403)
        return FederatedUser(name, sorted(r.removeprefix("role:") for r in roles))
