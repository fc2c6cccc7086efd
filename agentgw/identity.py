"""Assembles the identity side of the gateway from settings: verifiers, the built-in authorization
server, API keys, and the `Authenticate` stage that uses them."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from agentgw.call import Call
from agentgw.errors import ConfigError
from agentgw.fetch_guard import FetchGuard
from agentgw.filters.authenticate import Authenticate
from agentgw.oauth.apikeys import ApiKeyStore, ApiKeyVerifier
from agentgw.oauth.federation import FederatedUsers, OidcLogin
from agentgw.oauth.jwks import LocalKeySet, RemoteKeySet
from agentgw.oauth.keys import ALGORITHM, SigningKeys
from agentgw.oauth.metadata import endpoint_scopes
from agentgw.oauth.pending import PendingLogins
from agentgw.oauth.refresh import RefreshTokenStore
from agentgw.oauth.registration import ClientInfo, ClientStore
from agentgw.oauth.server import AuthorizationServer
from agentgw.oauth.verify import BearerVerifier, JwtVerifier, TrustedIssuer
from agentgw.registry.secrets import SecretRefused
from agentgw.registry.store import RegistryStore
from agentgw.settings import Settings
from agentgw.storage import ensure_private_dir

__all__ = [
    "Identity",
    "build_identity",
    "client_stores",
    "issuer_url",
    "record_base_url",
    "revoke_registered_client",
    "signing_key_path",
    "signing_keys",
]


@dataclass
class Identity:
    """Everything that turns credentials into principals, built once."""

    authenticate: Authenticate
    jwt: JwtVerifier
    api_keys: ApiKeyStore
    api_key_verifier: ApiKeyVerifier
    keys: SigningKeys | None
    server: AuthorizationServer | None
    http: httpx.AsyncClient
    issuers: list[str]
    clients: ClientStore
    refresh: RefreshTokenStore
    pending: PendingLogins

    async def aclose(self) -> None:
        await self.http.aclose()

    def list_clients(self) -> list[ClientInfo]:
        """Every dynamically registered client."""
        return self.clients.list()

    def revoke_client(self, client_id: str) -> bool:
        """Revoke a registered client and end its logins; False if there is no such client."""
        if not revoke_registered_client(self.clients, self.refresh, client_id):
            return False
        if self.server is not None:
            self.server.forget_client(client_id)
        return True


def revoke_registered_client(clients: ClientStore, refresh: RefreshTokenStore, client_id: str) -> bool:
    """Revoke a registered client and every login (refresh token) it holds; False if unknown."""
    if not clients.revoke(client_id):
        return False
    refresh.revoke_client(client_id)
    return True


def client_stores(settings: Settings, engine: Engine) -> tuple[ClientStore, RefreshTokenStore]:
    """The registered clients and the logins of the built-in authorization server."""
    builtin = settings.auth.builtin
    return ClientStore(engine), RefreshTokenStore(
        engine, ttl_s=builtin.refresh_ttl_s, max_s=builtin.refresh_max_s
    )


BASE_URL_FILE = "base-url"


def record_base_url(settings: Settings) -> None:
    """Note in the data directory the URL the gateway serves at, for `issuer_url` in other commands."""
    ensure_private_dir(settings.data_dir)  # `serve --workers` records before any worker builds it
    (settings.data_dir / BASE_URL_FILE).write_text(settings.base_url + "\n")


def issuer_url(settings: Settings) -> str:
    """The built-in authorization server's issuer (and the gateway's base URL) as a command sees it.

    `public_url` if set; else the URL the gateway last started on this data directory serves at
    (`agentgw serve --port N` records it), so that `agentgw token issue` mints tokens that gateway
    trusts; else the one `host` and `port` make. `AGENTGW_HOST`/`AGENTGW_PORT` say which gateway
    is meant: they win over the record.
    """
    if settings.public_url or "AGENTGW_HOST" in os.environ or "AGENTGW_PORT" in os.environ:
        return settings.base_url
    try:
        recorded = (settings.data_dir / BASE_URL_FILE).read_text().strip()
    except OSError:
        return settings.base_url
    parts = urlsplit(recorded)
    if parts.scheme in ("http", "https") and parts.hostname and not parts.query and not parts.fragment:
        return recorded.rstrip("/")
    return settings.base_url


def signing_key_path(settings: Settings) -> Path:
    """Where the built-in authorization server's key file is; the gateway's other keys go beside it."""
    return settings.auth.builtin.signing_key or settings.data_dir / "oauth-keys.json"


def signing_keys(settings: Settings) -> SigningKeys:
    """The built-in authorization server's key file (created with a first key when missing): the
    gateway and every command (`agentgw token issue`, `agentgw keys rotate-signing`) find it by the
    same settings, in the data directory unless `auth.builtin.signing_key` names it."""
    return SigningKeys(signing_key_path(settings), rotate_after_s=settings.auth.builtin.rotate_after_s)


def build_identity(settings: Settings, engine: Engine, registry: RegistryStore) -> Identity:
    """Build the verifiers, the built-in authorization server (if enabled) and the identity stage."""
    auth = settings.auth
    http = httpx.AsyncClient(follow_redirects=False)
    issuers = [
        TrustedIssuer(
            issuer.issuer,
            RemoteKeySet(
                issuer.issuer,
                issuer.jwks_uri,
                http,
                min_refresh_s=auth.jwks_min_refresh_s,
                max_age_s=auth.jwks_max_age_s,
            ),
            frozenset(issuer.algorithms),
            frozenset(issuer.audiences),
            tuple(issuer.role_claims),
        )
        for issuer in auth.issuers
    ]
    keys = None
    if auth.builtin.enabled:
        keys = signing_keys(settings)
        keys.rotate_if_due()
        issuers.append(TrustedIssuer(settings.base_url, LocalKeySet(keys), frozenset({ALGORITHM})))
    jwt_verifier = JwtVerifier(issuers, leeway_s=auth.leeway_s)
    api_keys = ApiKeyStore(engine)
    api_key_verifier = ApiKeyVerifier(api_keys, cache_s=auth.api_keys.cache_s)

    def required_scopes(call: Call) -> list[str]:
        endpoint = call.endpoint or ""
        if endpoint == "/mcp":
            # The merged endpoint: a call needs the scopes of the server that serves it.
            spec = registry.server(call.upstream)
            return list(spec.scopes) if spec is not None else []
        return endpoint_scopes(registry, endpoint) or []

    authenticate = Authenticate(
        BearerVerifier(
            jwt_verifier if issuers else None, api_key_verifier if auth.api_keys.enabled else None
        ),
        allow_anonymous=settings.allow_anonymous,
        base_url=settings.base_url,
        required_scopes=required_scopes,
    )
    clients, refresh = client_stores(settings, engine)
    pending = PendingLogins(engine)
    server = None
    if keys is not None:
        login, federated = _federation(settings, engine, http, pending)

        def known_scopes() -> set[str]:
            scopes = {s for spec in registry.servers() for s in spec.scopes}
            return scopes | {s for client in auth.builtin.clients for s in client.scopes}

        server = AuthorizationServer(
            settings.base_url,
            auth.builtin,
            keys,
            verifier=jwt_verifier,
            known_scopes=known_scopes,
            pending=pending,
            fetch=FetchGuard(settings.fetch_allow, ssl_context=_fetch_trust(settings.fetch_ca_file)),
            clients=clients,
            refresh=refresh,
            login=login,
            federated=federated,
        )
    return Identity(
        authenticate,
        jwt_verifier,
        api_keys,
        api_key_verifier,
        keys,
        server,
        http,
        [i.issuer for i in issuers if i.issuer != settings.base_url]
        + ([settings.base_url] if keys is not None else []),
        clients,
        refresh,
        pending,
    )


def _federation(
    settings: Settings, engine: Engine, http: httpx.AsyncClient, pending: PendingLogins
) -> tuple[OidcLogin | None, FederatedUsers | None]:
    """The login at the organisation's OpenID provider, if configured (`auth.builtin.identity_provider`).

    Raises:
        ConfigError: its client secret is not a declared secret that may go to the provider.
    """
    idp = settings.auth.builtin.identity_provider
    if idp is None:
        return None, None
    read_secret = None
    if idp.client_secret is not None:
        secrets = settings.admission().secrets
        name = idp.client_secret
        try:
            secrets.check(name, [idp.issuer], from_config=True)
        except SecretRefused as exc:
            raise ConfigError(f"auth.builtin.identity_provider.client_secret: {exc}") from exc

        def read_secret() -> str:
            return secrets.read(name).reveal()

    login = OidcLogin(
        idp,
        redirect_uri=f"{settings.base_url}/oauth/callback",
        http=http,
        pending=pending,
        client_secret=read_secret,
        leeway_s=settings.auth.leeway_s,
        jwks_min_refresh_s=settings.auth.jwks_min_refresh_s,
        jwks_max_age_s=settings.auth.jwks_max_age_s,
    )
    return login, FederatedUsers(engine, issuer=idp.issuer, session_max_s=idp.session_max_s)


def _fetch_trust(ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS trust of caller-chosen fetches: the system's, plus `fetch_ca_file` when set.

    Raises:
        ConfigError: the file cannot be read as PEM certificates.
    """
    if ca_file is None:
        return None
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"fetch_ca_file {ca_file}: cannot load certificates ({exc})") from exc
    return context
