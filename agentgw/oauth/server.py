"""The built-in authorization server (authlib), for the embedded default and local use.

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata; the issuer is the gateway's base URL
    GET  /oauth/jwks                               public keys (every key still published after rotation)
    GET  /oauth/authorize                          login form (authorization code + PKCE S256, required)
    POST /oauth/authorize                          checks the user's password, redirects with a code
    POST /oauth/token                              authorization_code, refresh_token (rotated),
                                                   client_credentials, and the RFC 8693 token-exchange grant
    POST /oauth/register                           RFC 7591 dynamic registration of public clients
    POST /oauth/revoke                             RFC 7009: revoking a refresh token ends its login
    GET  /oauth/callback                           back from the organisation's OpenID provider, when
                                                   users sign in there (agentgw/oauth/federation.py)

Clients are pre-registered in the config, registered dynamically (stored in the database,
agentgw/oauth/registration.py), or are Client ID Metadata Documents: an https client id
whose document the server fetches (through agentgw/fetch_guard.py: public addresses only, unless
`fetch_allow` names others; a document that cannot be used is an `invalid_client` that says why).
Authorization codes, like the sign-ins waiting at the organisation's provider, are kept in the
database (agentgw/oauth/pending.py): a login started on one node finishes on any other. A database
that cannot be reached refuses the step at hand with `temporarily_unavailable` (to the client's
redirect URI at the authorization endpoint, as a 503 at the token endpoint), having written nothing.
Access tokens are RFC 9068 JWTs whose audience is the RFC 8707 `resource` the client asked for
(default: the gateway's `/mcp`), never wider than the gateway. A login (authorization code) also
gets a refresh token, rotated on every use (agentgw/oauth/refresh.py); a token or refresh request may
name any resource the login's resource covers (docs/decisions/0109).

authlib's server framework is synchronous and knows no Starlette: each handler reads the request
(and fetches anything remote, such as a metadata document or a JWKS, or a registered client) first,
then hands authlib a fully-read request; the endpoints whose hooks use the database (a code saved or
taken, a refresh token) run it in a worker thread.

One module, though long: authlib's server is one class whose grants, hooks and endpoints share its
client, code and key lookups. What stands alone has its own module (registration, refresh tokens,
federation, keys, CIMD fetching).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import orjson
from authlib.oauth2 import rfc6749
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    AccessDeniedError,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import QueryParams
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from agentgw.call import Principal
from agentgw.errors import GatewayError
from agentgw.fetch_guard import FetchGuard, FetchRefused
from agentgw.oauth.config import BuiltinAuthServer, BuiltinClient, BuiltinUser
from agentgw.oauth.exchange import TOKEN_TYPES, actor_allowed, delegation, narrowed_scopes
from agentgw.oauth.federation import FederatedUsers, FederationError, OidcLogin
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.pending import IssuedCode, PendingLogins
from agentgw.oauth.refresh import Login, RefreshRefused, RefreshTokenStore
from agentgw.oauth.registration import (
    ClientInfo,
    ClientStore,
    RegistrationError,
    RegistrationLimiter,
    parse_registration,
)
from agentgw.oauth.verify import JwtVerifier, audience_covers, canonical_uri

__all__ = [
    "TOKEN_EXCHANGE",
    "AuthorizationServer",
    "check_password",
    "hash_password",
    "hash_secret",
    "mint_token",
]

log = logging.getLogger(__name__)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105  (a URN, not a secret)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
CODE_TTL_S = 300
CIMD_TTL_S = 300
CIMD_MAX_BYTES = 5 * 1024
CIMD_TIMEOUT_S = 5.0
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
REGISTERED_PREFIX = "agc_"
REGISTERED_TTL_S = 30
MAX_NAME = 100
# An authorization request's parameters, all together: what a client sends, a sign-in at the
# provider keeps in the database until the browser comes back.
MAX_AUTHORIZE_REQUEST = 8 * 1024
# What a sign-in at the provider keeps of the client's request (the rest is not the server's to keep).
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
)
UNAVAILABLE = "the authorization server's database cannot be reached; try again shortly"


# --- secrets ---


def hash_password(password: str) -> str:
    """`scrypt$<salt>$<hash>` for a user's password in the config."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` value (False for a malformed one)."""
    try:
        scheme, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **SCRYPT)
        return hmac.compare_digest(actual, bytes.fromhex(digest))
    except ValueError:
        return False


def hash_secret(secret: str) -> str:
    """The sha256 hex a client secret is stored as (secrets are random, so no slow hash is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_token(
    keys: SigningKeys,
    issuer: str,
    *,
    subject: str,
    audience: str | Sequence[str],
    client_id: str | None = None,
    scopes: Sequence[str] = (),
    roles: Sequence[str] = (),
    act: Mapping[str, Any] | None = None,
    ttl_s: int = 3600,
    now: float | None = None,
) -> tuple[str, int]:
    """Sign an access token; returns it and its lifetime in seconds."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience if isinstance(audience, str) else list(audience),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_s,
        "jti": secrets.token_urlsafe(16),
    }
    if client_id:
        claims["client_id"] = client_id
    if scopes:
        claims["scope"] = " ".join(scopes)
    if roles:
        claims["roles"] = [r.removeprefix("role:") for r in roles]
    if act:
        claims["act"] = dict(act)
    return keys.sign(claims), ttl_s


# --- clients and codes (the models authlib asks for) ---


@dataclass(slots=True)
class _Client:
    client_id: str
    redirect_uris: list[str]
    grant_types: list[str]
    scopes: list[str]
    roles: list[str]
    secret_sha256: str | None
    known_scopes: Callable[[], set[str]]
    # Resources outside the gateway this client may get tokens for, canonical; extra exchange scopes.
    audiences: frozenset[str] = frozenset()
    exchange_scopes: frozenset[str] = frozenset()
    # What the login page calls the client (its registered or configured name); default its id.
    name: str | None = None

    @property
    def public(self) -> bool:
        return self.secret_sha256 is None

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        allowed = set(self.scopes) or self.known_scopes()
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret_sha256 is not None and hmac.compare_digest(
            self.secret_sha256, hash_secret(client_secret)
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if endpoint not in ("token", "revocation"):
            return True
        return method == "none" if self.public else method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type in ("client_credentials", TOKEN_EXCHANGE) and self.public:
            return False  # only confidential clients may act without a user
        if grant_type == "refresh_token":  # every login gets a refresh token
            return "authorization_code" in self.grant_types
        return grant_type in self.grant_types


@dataclass(slots=True)
class _Code:
    code: str
    client_id: str
    redirect_uri: str | None
    scope: str
    user: BuiltinUser
    resource: str  # what the user authorized: a token may be for it or anything inside it
    code_challenge: str
    code_challenge_method: str

    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


class _Payload(rfc6749.OAuth2Payload):  # type: ignore[misc]  # authlib is untyped
    def __init__(self, datalist: Mapping[str, list[str]]) -> None:
        self._datalist = defaultdict(list, {k: list(v) for k, v in datalist.items()})
        self._data = {k: v[0] for k, v in datalist.items() if v}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class _Request(rfc6749.OAuth2Request):  # type: ignore[misc]  # authlib is untyped
    """A request read whole, in authlib's shape; `exchange` holds pre-verified RFC 8693 tokens."""

    def __init__(self, method: str, url: str, headers: Mapping[str, str], query: Any, form: Any) -> None:
        super().__init__(method, url, headers=headers)  # case-insensitive: authlib asks for "Authorization"
        self._query = {k: query.get(k) for k in query}
        self._form = {k: form.get(k) for k in form}
        merged: dict[str, list[str]] = defaultdict(list)
        for source in (query, form):
            for key in source:
                merged[key].extend(str(v) for v in source.getlist(key))
        self.payload = _Payload(merged)
        self.exchange: _Exchange | None = None

    @property
    def args(self) -> dict[str, Any]:
        return self._query

    @property
    def form(self) -> dict[str, Any]:
        return self._form


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Exchange:
    subject: _Verified
    actor: _Verified | None


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]  # authlib is untyped
    """RFC 8707: the requested resource is not one this server issues tokens for."""

    error = "invalid_target"


class TemporarilyUnavailableError(OAuth2Error):  # type: ignore[misc]  # authlib is untyped
    """RFC 6749 section 4.1.2.1: the identity provider the user signs in at cannot be used now."""

    error = "temporarily_unavailable"


class _PkceS256(CodeChallenge):  # type: ignore[misc]  # authlib is untyped
    """PKCE is required of every client, with S256 only (OAuth 2.1)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012  (authlib's class attribute)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with method S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256")
        super().validate_code_challenge(grant, redirect_uri)


# --- the server ---


class AuthorizationServer(rfc6749.AuthorizationServer):  # type: ignore[misc]  # authlib is untyped
    """The built-in authorization server: authlib's framework, with the gateway's clients and keys."""

    def __init__(
        self,
        issuer: str,
        config: BuiltinAuthServer,
        keys: SigningKeys,
        *,
        verifier: JwtVerifier,
        known_scopes: Callable[[], set[str]],
        pending: PendingLogins,
        fetch: FetchGuard | None = None,
        clients: ClientStore | None = None,
        refresh: RefreshTokenStore | None = None,
        login: OidcLogin | None = None,
        federated: FederatedUsers | None = None,
    ) -> None:
        super().__init__()
        self.issuer = issuer.rstrip("/")
        self.config = config
        self.keys = keys
        self._verifier = verifier
        self._known_scopes = known_scopes
        self._fetch = fetch or FetchGuard()
        self._clients = {c.client_id: self._client(c) for c in config.clients}
        self._users = {u.name: u for u in config.users}
        # Codes (and the provider's pending sign-ins) in the database: any node finishes a login.
        self.pending = pending
        self._cimd: dict[str, tuple[float, _Client]] = {}
        # Registered clients (database), read before each request; an unknown or revoked one is dropped.
        self.client_store = clients
        self._registered: dict[str, tuple[float, _Client]] = {}
        self.refresh_store = refresh
        # Users may sign in at the organisation's OpenID provider instead of with a local password.
        self.login = login
        self._federated = federated
        self._limiter = RegistrationLimiter(config.registration.per_address_per_minute)
        server = self

        class _AuthorizationCode(grants.AuthorizationCodeGrant):  # type: ignore[misc]  # authlib is untyped
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]  # noqa: RUF012

            def save_authorization_code(self, code: str, request: _Request) -> None:
                server._save_code(code, request)

            def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
                return server._take_code(code, client)

            def delete_authorization_code(self, authorization_code: _Code) -> None:
                """`_take_code` deleted it already."""

            def authenticate_user(self, authorization_code: _Code) -> BuiltinUser:
                return authorization_code.user

            def generate_token(
                self, user: BuiltinUser | None = None, scope: str | None = None, **_: Any
            ) -> Any:
                code: _Code = self.request.authorization_code
                resource = server._within(self.request.payload.datalist.get("resource", []), code.resource)
                answer = server._token(self.request, user.name if user else None, scope, resource, user)
                if server.refresh_store is not None and user is not None:
                    answer["refresh_token"] = server.refresh_store.start(
                        client_id=self.request.client.client_id,
                        subject=user.name,
                        scope=scope or "",
                        resource=code.resource,
                    )
                return answer

        class _Refresh(grants.RefreshTokenGrant):  # type: ignore[misc]  # authlib is untyped
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]  # noqa: RUF012

            def authenticate_refresh_token(self, refresh_token: str) -> Login:
                if server.refresh_store is None:
                    raise InvalidGrantError("refresh tokens are not issued here")
                payload = self.request.payload

                def check(login: Login) -> None:
                    # A request the login cannot serve is refused before its token is spent.
                    server._within(payload.datalist.get("resource", []), login.resource)
                    if not set((payload.scope or "").split()) <= set(login.scope.split()):
                        raise InvalidScopeError("the scope is wider than the login's")

                try:
                    return server.refresh_store.take(refresh_token, self.request.client.client_id, check)
                except RefreshRefused as exc:
                    raise InvalidGrantError(str(exc)) from exc

            def authenticate_user(self, login: Login) -> BuiltinUser:
                user = server._users.get(login.subject)
                if user is None and server._federated is not None:
                    # Signed in at the provider: the roles it gave, until the sign-in is too old.
                    federated = server._federated.current(login.subject)
                    if federated is not None:
                        user = _federated_user(federated.name, federated.roles)
                if user is None:
                    raise InvalidGrantError("the user of this login is no longer known or must sign in again")
                return user

            def revoke_old_credential(self, login: Login) -> None:
                """`take` marked the old refresh token used already."""

            def issue_token(self, user: BuiltinUser, login: Login) -> Any:
                scope = self.request.payload.scope or login.scope
                resource = server._within(self.request.payload.datalist.get("resource", []), login.resource)
                answer = server._token(self.request, user.name, scope, resource, user)
                store = server.refresh_store
                if store is None:
                    raise InvalidGrantError("refresh tokens are not issued here")
                try:
                    answer["refresh_token"] = store.rotate(login.id)
                except RefreshRefused as exc:
                    raise InvalidGrantError(str(exc)) from exc
                return answer

        class _Revocation(RevocationEndpoint):  # type: ignore[misc]  # authlib is untyped
            CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]  # noqa: RUF012
            SUPPORTED_TOKEN_TYPES = ("access_token", "refresh_token")

            def authenticate_token(self, request: _Request, client: _Client) -> str | None:
                self.check_params(request, client)
                return str(request.form["token"])

            def revoke_token(self, token: str, request: _Request) -> None:
                # Access tokens are self-contained JWTs that expire on their own: revoking one is a
                # no-op that answers 200 (RFC 7009 section 2.2); a refresh token ends its login.
                if server.refresh_store is not None:
                    server.refresh_store.revoke_token(token, request.client.client_id)

        class _ClientCredentials(grants.ClientCredentialsGrant):  # type: ignore[misc]  # authlib is untyped
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

            def validate_requested_scope(self) -> None:
                super().validate_requested_scope()
                self.request.scope = self.client.get_allowed_scope(self.request.payload.scope)

            def generate_token(self, scope: str | None = None, **_: Any) -> Any:
                data = self.request.payload.datalist
                resource = server._resource(
                    [*data.get("resource", []), *data.get("audience", [])], self.client
                )
                return server._token(self.request, None, self.request.scope, resource, None)

        self.register_grant(_AuthorizationCode, [_PkceS256(required=True)])
        self.register_grant(_Refresh)
        self.register_grant(_ClientCredentials)
        self.register_grant(_TokenExchange)
        self.register_endpoint(_Revocation)

    # authlib hooks
    def query_client(self, client_id: str) -> _Client | None:
        if client_id in self._clients:
            return self._clients[client_id]
        cached = self._registered.get(client_id) or self._cimd.get(client_id)
        return cached[1] if cached is not None and cached[0] > time.monotonic() else None

    def save_token(self, token: Any, request: Any) -> None:
        """JWT access tokens are self-contained: nothing to store."""

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signals."""

    def create_oauth2_request(self, request: Any) -> Any:
        return request  # handlers build `_Request` themselves, after reading the body

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        header_map = dict(headers or [])
        if status in (301, 302, 303, 307, 308):
            return RedirectResponse(header_map["Location"], status_code=302)
        header_map.pop("Content-Type", None)
        header_map.setdefault("Cache-Control", "no-store")
        return JSONResponse(body if isinstance(body, dict) else {}, status_code=status, headers=header_map)

    def validate_requested_scope(self, scope: str | None) -> None:
        unknown = set((scope or "").split()) - self._known_scopes()
        if unknown:
            raise InvalidScopeError(f"unknown scope: {' '.join(sorted(unknown))}")

    # clients
    def add_client(self, spec: BuiltinClient) -> None:
        """Pre-register `spec` as the gateway's own client (the console), unless the config file
        defines a client of that id: the operator's definition wins."""
        self._clients.setdefault(spec.client_id, self._client(spec))

    def _client(self, spec: BuiltinClient) -> _Client:
        return _Client(
            spec.client_id,
            list(spec.redirect_uris),
            list(spec.grant_types),
            list(spec.scopes),
            list(spec.roles),
            spec.client_secret_sha256,
            self._known_scopes,
            frozenset(canonical_uri(a) for a in spec.exchange.audiences),
            frozenset(spec.exchange.scopes),
            spec.client_name,
        )

    async def _prefetch_registered(self, client_id: str) -> None:
        """Read a dynamically registered client from the database (every node sees a revocation at
        its next request)."""
        store = self.client_store
        if store is None or not client_id.startswith(REGISTERED_PREFIX) or len(client_id) > MAX_NAME:
            return
        try:
            info = await anyio.to_thread.run_sync(store.get, client_id)
        except SQLAlchemyError as exc:
            log.warning("registered client not read: database unavailable (%s)", type(exc).__name__)
            raise TemporarilyUnavailableError(UNAVAILABLE, status_code=503) from exc
        if info is None:
            self._registered.pop(client_id, None)
            return
        self._registered[client_id] = (time.monotonic() + REGISTERED_TTL_S, self._registered_client(info))
        now = time.monotonic()
        for stale in [c for c, (until, _) in self._registered.items() if until < now]:
            del self._registered[stale]

    def _registered_client(self, info: ClientInfo) -> _Client:
        return _Client(
            info.client_id,
            list(info.redirect_uris),
            list(info.grant_types),
            [],
            [],
            None,
            self._known_scopes,
            name=info.client_name,
        )

    async def _prefetch_client(self, client_id: str | None) -> None:
        """Fetch a Client ID Metadata Document when the client id is its https URL (cached).

        Raises:
            InvalidClientError: the document cannot be used; the description says why (the caller
                chose the URL, so the reason is theirs to read).
        """
        if client_id and client_id not in self._clients:
            await self._prefetch_registered(client_id)
        if not client_id or client_id in self._clients or not self.config.client_id_metadata_documents:
            return
        parts = urlsplit(client_id)
        if parts.scheme == "http" and parts.hostname:
            # A client that means a metadata document by this id is told why it is not one.
            raise InvalidClientError(
                description="client metadata document refused: a client id URL must be https"
            )
        if parts.scheme != "https" or not parts.hostname or parts.path in ("", "/") or parts.fragment:
            return
        cached = self._cimd.get(client_id)
        if cached is not None and cached[0] > time.monotonic():
            return
        try:
            raw = await self._fetch.get(
                client_id,
                max_bytes=CIMD_MAX_BYTES,
                timeout_s=CIMD_TIMEOUT_S,
                headers={"accept": "application/json"},
            )
            client = self._client_from_document(client_id, _json(raw))
        except (FetchRefused, ValueError) as exc:
            log.warning("client metadata document refused client_id=%s reason=%s", client_id, exc)
            raise InvalidClientError(description=f"client metadata document refused: {exc}") from exc
        self._cimd[client_id] = (time.monotonic() + CIMD_TTL_S, client)

    def _client_from_document(self, client_id: str, document: Any) -> _Client:
        if not isinstance(document, dict) or document.get("client_id") != client_id:
            raise ValueError("the document's client_id is not its own URL")
        method = document.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise ValueError("a metadata-document client is public: token_endpoint_auth_method must be none")
        redirect_uris = document.get("redirect_uris")
        if not isinstance(redirect_uris, list) or not all(isinstance(u, str) for u in redirect_uris):
            raise ValueError("redirect_uris must be a list of strings")
        name = document.get("client_name")
        return _Client(
            client_id,
            redirect_uris,
            ["authorization_code"],
            [],
            [],
            None,
            self._known_scopes,
            name=name[:MAX_NAME] if isinstance(name, str) and name else None,
        )

    # codes
    def _save_code(self, code: str, request: _Request) -> None:
        user: BuiltinUser = request.user
        issued = IssuedCode(
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope,
            subject=user.name,
            roles=list(user.roles),
            resource=self._resource(request.payload.datalist.get("resource", [])),
            code_challenge=request.payload.data["code_challenge"],
            code_challenge_method=request.payload.data["code_challenge_method"],
        )
        self.pending.save_code(code, issued, CODE_TTL_S)

    def _take_code(self, code: str, client: _Client) -> _Code | None:
        # One use only: taken out before it is checked, so a replay (on any node) finds nothing.
        found = self.pending.take_code(code)
        if found is None or found.client_id != client.client_id:
            return None
        # A local user as configured now; a user of the provider with the roles it gave at sign-in.
        user = self._users.get(found.subject) or _federated_user(found.subject, found.roles)
        return _Code(
            code=code,
            client_id=found.client_id,
            redirect_uri=found.redirect_uri,
            scope=found.scope,
            user=user,
            resource=found.resource,
            code_challenge=found.code_challenge,
            code_challenge_method=found.code_challenge_method,
        )

    # tokens
    def _resource(self, resources: Sequence[str], client: _Client | None = None) -> str:
        """The one RFC 8707 resource a token is for: inside this gateway, or one of the client's
        allowed audiences (`exchange.audiences`); default `<base>/mcp`."""
        if len(set(resources)) > 1:
            raise InvalidTargetError("one resource per token")
        resource = resources[0] if resources else f"{self.issuer}/mcp"
        if client is not None and canonical_uri(resource) in client.audiences:
            return resource
        if not audience_covers(self.issuer, resource):
            raise InvalidTargetError(f"resource {resource} is not served by this gateway")
        return resource

    def _within(self, resources: Sequence[str], granted: str) -> str:
        """The resource a token of a login for `granted` is for: the one requested, if `granted` covers
        it (one login for the gateway's base URL serves every endpoint), else `granted`.

        Raises:
            InvalidTargetError: more than one resource, or one the login does not cover.
        """
        if len(set(resources)) > 1:
            raise InvalidTargetError("one resource per token")
        if not resources:
            return granted
        if not audience_covers(granted, resources[0]):
            raise InvalidTargetError(f"resource {resources[0]} is not within the authorized {granted}")
        return resources[0]

    def _token(
        self, request: _Request, user: str | None, scope: str | None, resource: str, who: BuiltinUser | None
    ) -> dict[str, Any]:
        client: _Client = request.client
        roles = who.roles if who is not None else client.roles
        token, ttl = mint_token(
            self.keys,
            self.issuer,
            subject=user or client.client_id,
            audience=resource,
            client_id=client.client_id,
            scopes=(scope or "").split(),
            roles=roles,
            ttl_s=self.config.token_ttl_s,
        )
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
        if scope:
            answer["scope"] = scope
        return answer

    # documents
    @property
    def registration_open(self) -> bool:
        return self.client_store is not None and self.config.registration.mode != "off"

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata."""
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/oauth/authorize",
            "token_endpoint": f"{self.issuer}/oauth/token",
            "jwks_uri": f"{self.issuer}/oauth/jwks",
            "revocation_endpoint": f"{self.issuer}/oauth/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "client_credentials",
                TOKEN_EXCHANGE,
            ],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "scopes_supported": sorted(self._known_scopes()),
            "client_id_metadata_document_supported": self.config.client_id_metadata_documents,
        }
        if self.registration_open:
            document["registration_endpoint"] = f"{self.issuer}/oauth/register"
        return document

    # HTTP
    async def _read(self, request: Request) -> _Request:
        """The request read whole; its URL is the issuer's (the public URL), not the socket's.

        Raises:
            OAuth2Error: the issuer is not https (or loopback http).
        """
        form = await request.form() if request.method == "POST" else request.query_params
        query = request.query_params if request.method == "POST" else QueryParams("")
        url = f"{self.issuer}{request.url.path}"
        oauth_request = _Request(request.method, url, request.headers, query, form)
        await self._prefetch_client(oauth_request.payload.client_id)
        return oauth_request

    @staticmethod
    def _bad_request(error: OAuth2Error) -> JSONResponse:
        # A refusal the client cannot be redirected with: 400, or 503 for a database out of reach.
        status = 503 if isinstance(error, TemporarilyUnavailableError) else 400
        return JSONResponse(dict(error.get_body()), status_code=status, headers={"Cache-Control": "no-store"})

    def _login_page(
        self, oauth_request: _Request, error: str | None = None, status: int = 200
    ) -> HTMLResponse:
        fields = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, values in oauth_request.payload.datalist.items()
            if k not in ("username", "password")
            for v in values
        )
        # The client's name, never its id or URL, which a client chooses to look like anything.
        known = self.query_client(oauth_request.payload.client_id or "")
        if known is None:
            shown = "An unknown client"
        elif known.name:
            shown = known.name
        else:  # a metadata document without a name: its host, not a path chosen to mislead
            shown = urlsplit(known.client_id).hostname or known.client_id
        client = html.escape(shown)
        # The name is the client's own choice; where the browser goes next is checked, so say it.
        returns = urlsplit(oauth_request.payload.redirect_uri or "").hostname
        back = f"<p>You then return to {html.escape(returns)}.</p>" if returns else ""
        problem = f"<p role='alert'>{html.escape(error)}</p>" if error else ""
        action = f"{self.issuer}/oauth/authorize"
        federated = ""
        if self.login is not None:
            provider = html.escape(self.login.config.display_name)
            federated = (
                f'<form method="post" action="{action}">{fields}'
                '<input type="hidden" name="login" value="idp">'
                f"<button>Sign in with {provider}</button></form>"
            )
        local = ""
        if self._users or self.login is None:
            local = (
                f'<form method="post" action="{action}">{fields}'
                '<label>User <input name="username" autocomplete="username"></label>'
                '<label>Password <input name="password" type="password" '
                'autocomplete="current-password"></label><button>Sign in</button></form>'
            )
        page = (
            "<!doctype html><title>agentgw sign-in</title>"
            f"<h1>Sign in</h1><p>{client} asks to act for you.</p>{back}{problem}{federated}{local}"
        )
        return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

    async def authorize(self, request: Request) -> Response:
        """GET: validate and show the login form; POST: check the password and redirect with a code."""
        try:
            oauth_request = await self._read(request)
            if _size(oauth_request.payload.datalist) > MAX_AUTHORIZE_REQUEST:
                raise InvalidRequestError("the authorization request is too large")
        except OAuth2Error as error:
            return self._bad_request(error)
        try:
            grant = self.get_consent_grant(oauth_request)
            self._resource(oauth_request.payload.datalist.get("resource", []))
        except OAuth2Error as error:
            if isinstance(error, InvalidTargetError):  # the client and redirect URI are verified by now
                error.redirect_uri, error.state = grant.redirect_uri, oauth_request.payload.state
            if getattr(error, "redirect_uri", None):
                return self.handle_error_response(oauth_request, error)  # type: ignore[no-any-return]  # authlib is untyped
            return self._bad_request(error)
        if self.login is not None and (
            (request.method == "GET" and not self._users)
            or (request.method == "POST" and oauth_request.form.get("login") == "idp")
        ):
            return await self._federate(oauth_request, grant)
        if request.method == "GET":
            return self._login_page(oauth_request)
        form = oauth_request.form
        user = self._users.get(str(form.get("username") or ""))
        if user is None or not check_password(str(form.get("password") or ""), user.password_hash):
            return self._login_page(oauth_request, "Unknown user or wrong password.", 401)
        return await self._issue_code(oauth_request, grant, user)

    async def _issue_code(self, oauth_request: _Request, grant: Any, user: BuiltinUser) -> Response:
        """Redirect to the client with a code, kept in the database (so in a worker thread); a database
        that cannot be reached is the client's `temporarily_unavailable`, and no code exists."""
        try:
            response: Response = await anyio.to_thread.run_sync(
                lambda: self.create_authorization_response(oauth_request, grant_user=user, grant=grant)
            )
        except SQLAlchemyError as exc:
            log.warning("authorization code not stored: database unavailable (%s)", type(exc).__name__)
            return self._refuse_to_client(oauth_request, grant, TemporarilyUnavailableError(UNAVAILABLE))
        return response

    async def _federate(self, oauth_request: _Request, grant: Any) -> Response:
        """Send the browser to the identity provider; the client's request waits for its answer."""
        assert self.login is not None
        params = {k: list(v) for k, v in oauth_request.payload.datalist.items() if k in AUTHORIZE_PARAMS}
        try:
            url = await self.login.begin(params)
        except FederationError as exc:
            return self._refuse_to_client(oauth_request, grant, TemporarilyUnavailableError(exc.message))
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})

    def _refuse_to_client(self, oauth_request: _Request, grant: Any, error: OAuth2Error) -> Response:
        """An error sent back to the client's (verified) redirect URI, with the request's state."""
        error.redirect_uri, error.state = grant.redirect_uri, oauth_request.payload.state
        return self.handle_error_response(oauth_request, error)  # type: ignore[no-any-return]  # authlib is untyped

    @staticmethod
    def _problem_page(message: str, status: int) -> HTMLResponse:
        page = (
            "<!doctype html><title>agentgw sign-in</title><h1>Sign-in failed</h1>"
            f"<p role='alert'>{html.escape(message)}</p>"
        )
        return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

    async def callback(self, request: Request) -> Response:
        """Back from the identity provider: verify who signed in, then answer the client's request."""
        if self.login is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        query = request.query_params
        try:
            pending = await self.login.take(str(query.get("state") or ""))
        except FederationError as exc:
            return self._problem_page(exc.message, exc.status)
        # The client's own request, as it first arrived: checked again (a client may be revoked meanwhile).
        original = QueryParams([(k, v) for k, values in pending.params.items() for v in values])
        oauth_request = _Request("GET", f"{self.issuer}/oauth/authorize", {}, original, QueryParams(""))
        try:
            await self._prefetch_client(oauth_request.payload.client_id)
            grant = self.get_consent_grant(oauth_request)
        except OAuth2Error as error:
            return self._bad_request(error)
        if query.get("iss") not in (None, self.login.config.issuer):
            # RFC 9207: an answer from another issuer (a mix-up) is not this provider's.
            log.warning("identity provider answer from another issuer iss=%r", str(query.get("iss"))[:200])
            failed = TemporarilyUnavailableError("the sign-in answer came from another issuer")
            return self._refuse_to_client(oauth_request, grant, failed)
        if query.get("error") or not query.get("code"):
            log.info("identity provider sign-in not completed error=%r", str(query.get("error"))[:100])
            return self._refuse_to_client(oauth_request, grant, AccessDeniedError("the user did not sign in"))
        try:
            user = await self.login.finish(pending, str(query["code"]))
            if user.name in self._users:
                log.warning("identity provider user refused: the name is a local user's user=%s", user.name)
                raise FederationError(f"{user.name} is a local user's name: sign in with the password", 403)
        except FederationError as exc:
            refusal: OAuth2Error = (
                AccessDeniedError(exc.message)
                if exc.status == 403
                else TemporarilyUnavailableError(exc.message)
            )
            return self._refuse_to_client(oauth_request, grant, refusal)
        if self._federated is not None:
            federated = self._federated
            try:
                await anyio.to_thread.run_sync(lambda: federated.signed_in(user))
            except SQLAlchemyError as exc:
                log.warning("sign-in not recorded: database unavailable (%s)", type(exc).__name__)
                return self._refuse_to_client(oauth_request, grant, TemporarilyUnavailableError(UNAVAILABLE))
        log.info("identity provider sign-in user=%s roles=%s", user.name, ",".join(user.roles))
        return await self._issue_code(oauth_request, grant, _federated_user(user.name, user.roles))

    async def token(self, request: Request) -> Response:
        """The token endpoint."""
        try:
            oauth_request = await self._read(request)
        except OAuth2Error as error:
            return self._bad_request(error)
        if oauth_request.payload.grant_type == TOKEN_EXCHANGE:
            try:
                oauth_request.exchange = await self._verify_exchange(oauth_request)
            except OAuth2Error as error:
                return self.handle_error_response(oauth_request, error)  # type: ignore[no-any-return]  # authlib is untyped
        # Codes and refresh tokens live in the database: the grants' synchronous hooks run off the loop.
        try:
            response: Response = await anyio.to_thread.run_sync(self.create_token_response, oauth_request)
        except SQLAlchemyError as exc:
            # Each store call is one transaction: a code not taken stays redeemable, one taken is spent.
            return _unavailable("token request", exc)
        return response

    async def revoke(self, request: Request) -> Response:
        """RFC 7009 revocation: a refresh token ends its login; anything else is answered 200."""
        try:
            oauth_request = await self._read(request)
        except OAuth2Error as error:
            return self._bad_request(error)
        try:
            response: Response = await anyio.to_thread.run_sync(
                self.create_endpoint_response, "revocation", oauth_request
            )
        except SQLAlchemyError as exc:
            # RFC 7009 2.2.1: 503 when the server cannot handle it now; the client retries, and the
            # token stays as it was (the revocation is one transaction).
            return _unavailable("revocation", exc)
        return response

    async def register(self, request: Request) -> Response:
        """RFC 7591 dynamic client registration of a public client."""
        registration = self.config.registration
        headers = {"Cache-Control": "no-store"}
        if registration.mode == "token":
            scheme, _, presented = (request.headers.get("authorization") or "").partition(" ")
            digest = hash_secret(presented.strip()) if scheme.lower() == "bearer" and presented else ""
            if not any(
                hmac.compare_digest(digest, known) for known in registration.initial_access_tokens_sha256
            ):
                body = {"error": "invalid_token", "error_description": "an initial access token is required"}
                challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                return JSONResponse(body, status_code=401, headers=headers | challenge)
        source = request.client.host if request.client is not None else "unknown"
        if not self._limiter.allow(source):
            body = {"error": "slow_down", "error_description": "too many registrations from this address"}
            return JSONResponse(body, status_code=429, headers=headers | {"Retry-After": "60"})
        store = self.client_store
        if store is None or registration.mode == "off":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            metadata = parse_registration(await request.body())
            answer = await anyio.to_thread.run_sync(
                lambda: store.register(metadata, source=source, max_clients=registration.max_clients)
            )
        except RegistrationError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        log.info("client registered client_id=%s from=%s", answer["client_id"], source)
        return JSONResponse(answer, status_code=201, headers=headers)

    def forget_client(self, client_id: str) -> None:
        """Drop a revoked client at once on this node (other nodes read it again per request)."""
        self._registered.pop(client_id, None)

    async def _inspect(self, token: str | None, token_type: str | None, what: str) -> _Verified:
        if not token:
            raise InvalidRequestError(f"{what} is required")
        if token_type not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise InvalidRequestError(f"{what}_type must be an access token or a JWT")
        try:
            principal, claims = await self._verifier.inspect(token)
        except GatewayError as exc:
            raise InvalidGrantError(f"the {what} is invalid: {exc.message}") from exc
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences or []
        if not any(isinstance(a, str) and audience_covers(self.issuer, a) for a in audiences):
            raise InvalidGrantError(f"the {what} was not issued for this gateway")
        return _Verified(principal, claims)

    async def _verify_exchange(self, request: _Request) -> _Exchange:
        data = request.payload.data
        subject = await self._inspect(
            data.get("subject_token"), data.get("subject_token_type"), "subject_token"
        )
        actor = None
        if data.get("actor_token") or data.get("actor_token_type"):
            actor = await self._inspect(data.get("actor_token"), data.get("actor_token_type"), "actor_token")
        requested = data.get("requested_token_type")
        if requested not in (None, ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise InvalidRequestError("only access tokens can be issued")
        return _Exchange(subject, actor)


def _federated_user(name: str, roles: Sequence[str]) -> BuiltinUser:
    """A user the identity provider signed in, in the shape local users have (no password; the name
    was checked by the federation's own, wider, pattern)."""
    return BuiltinUser.model_construct(name=name, password_hash="!", roles=list(roles))  # noqa: S106  (no password: matches no scrypt hash)


def _size(datalist: Mapping[str, Sequence[str]]) -> int:
    return sum(len(k) + len(v) for k, values in datalist.items() for v in values)


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError("the document is not JSON") from exc


def _actor_claims(exchange: _Exchange, client_id: str, issuer: str) -> dict[str, Any]:
    """Who acts: the actor token's subject (and issuer), else the authenticated client itself."""
    if exchange.actor is None:
        return {"sub": client_id}
    claims = exchange.actor.claims
    actor = {"sub": str(claims["sub"])}
    if claims.get("iss") not in (None, issuer):
        actor["iss"] = str(claims["iss"])
    return actor


class _TokenExchange(grants.BaseGrant, grants.TokenEndpointMixin):  # type: ignore[misc]  # authlib is untyped
    """RFC 8693: a token for `resource`/`audience` that carries the subject's identity and an `act`
    claim naming the actor (the actor token's subject, else the client), earlier actors nested inside.

    The checks a real STS makes: the client is confidential and allowed the grant; the subject (and
    actor) tokens are valid tokens for this gateway; an actor token is the client's own; the target is
    inside the gateway or one of the client's `exchange.audiences` (else `invalid_target`); scopes only
    narrow (plus the client's `exchange.scopes`); `may_act` in the subject token names the actor; the
    chain stays usable; and the token never outlives the subject's (docs/decisions/0601)."""

    GRANT_TYPE = TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError("the client may not use token exchange")
        self.request.client = client
        exchange: _Exchange | None = self.request.exchange
        if exchange is None:
            raise InvalidRequestError("subject_token is required")
        if exchange.actor is not None and client.get_client_id() not in (
            exchange.actor.claims.get("sub"),
            exchange.actor.principal.client_id,
        ):
            raise InvalidGrantError("the actor token is not the authenticated client's own")
        self.request.scope = " ".join(
            narrowed_scopes(
                self.request.payload.scope, exchange.subject.principal.scopes, client.exchange_scopes
            )
        )
        server: AuthorizationServer = self.server
        actor = _actor_claims(exchange, client.get_client_id(), server.issuer)
        if not actor_allowed(exchange.subject.claims.get("may_act"), actor):
            raise InvalidGrantError("the subject token does not allow this actor (may_act)")
        data = self.request.payload.datalist
        self.request.resource = server._resource(
            [*data.get("resource", []), *data.get("audience", [])], client
        )
        self.request.act = delegation(actor, exchange.subject.claims.get("act"))

    def create_token_response(self) -> tuple[int, dict[str, Any], Any]:
        server: AuthorizationServer = self.server
        exchange: _Exchange = self.request.exchange
        subject = exchange.subject
        remaining = int(subject.claims["exp"]) - int(time.time())
        token, ttl = mint_token(
            server.keys,
            server.issuer,
            subject=str(subject.claims["sub"]),
            audience=self.request.resource,
            client_id=self.client.get_client_id(),
            scopes=self.request.scope.split(),
            roles=subject.principal.roles,
            act=self.request.act,
            ttl_s=max(1, min(server.config.token_ttl_s, remaining)),
        )
        requested = self.request.payload.data.get("requested_token_type")
        body: dict[str, Any] = {
            "access_token": token,
            "issued_token_type": requested if requested == TOKEN_TYPES["jwt"] else ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": ttl,
        }
        if self.request.scope:
            body["scope"] = self.request.scope
        return 200, body, self.TOKEN_RESPONSE_HEADER


def oauth_router(server: AuthorizationServer) -> APIRouter:
    """The built-in authorization server's public routes."""
    router = APIRouter(tags=["oauth"])

    @router.get("/.well-known/oauth-authorization-server")
    async def metadata() -> JSONResponse:
        return JSONResponse(server.metadata())

    @router.get("/oauth/jwks")
    async def jwks() -> JSONResponse:
        return JSONResponse(server.keys.jwks(), headers={"Cache-Control": "max-age=300"})

    @router.api_route("/oauth/authorize", methods=["GET", "POST"], include_in_schema=False)
    async def authorize(request: Request) -> Response:
        return await server.authorize(request)

    @router.post("/oauth/token", include_in_schema=False)
    async def token(request: Request) -> Response:
        return await server.token(request)

    @router.post("/oauth/revoke", include_in_schema=False)
    async def revoke(request: Request) -> Response:
        return await server.revoke(request)

    if server.login is not None:

        @router.get("/oauth/callback", include_in_schema=False)
        async def callback(request: Request) -> Response:
            return await server.callback(request)

    if server.registration_open:

        @router.post("/oauth/register", include_in_schema=False)
        async def register(request: Request) -> Response:
            return await server.register(request)

    return router


def _unavailable(what: str, exc: SQLAlchemyError) -> Response:
    """The OAuth answer of an endpoint whose database cannot be reached: 503, retry later."""
    log.warning("%s refused: database unavailable (%s)", what, type(exc).__name__)
    body = {"error": "temporarily_unavailable", "error_description": UNAVAILABLE}
    return JSONResponse(body, status_code=503, headers={"Cache-Control": "no-store", "Retry-After": "5"})
