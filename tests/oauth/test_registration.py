"""Dynamic client registration policy and the refresh-token store, in-process: initial access tokens,
the cap on clients, the per-address rate limit, registration switched off, and one winner when two
parties race on one refresh token."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agentgw.oauth.config import BuiltinAuthServer, RegistrationSettings
from agentgw.oauth.jwks import LocalKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.pending import PendingLogins
from agentgw.oauth.refresh import RefreshRefused, RefreshTokenStore
from agentgw.oauth.registration import ClientStore, RegistrationLimiter
from agentgw.oauth.server import AuthorizationServer, hash_secret, oauth_router
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from agentgw.storage import make_engine

BASE = "http://127.0.0.1:8080"
METADATA = {"redirect_uris": ["http://localhost:33418/callback"], "client_name": "cli"}

Server = Callable[[RegistrationSettings], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def server(tmp_path: Path) -> Server:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    keys = SigningKeys(tmp_path / "keys.json")

    @asynccontextmanager
    async def start(registration: RegistrationSettings) -> AsyncIterator[httpx.AsyncClient]:
        auth = AuthorizationServer(
            BASE,
            BuiltinAuthServer(registration=registration),
            keys,
            verifier=JwtVerifier([TrustedIssuer(BASE, LocalKeySet(keys))]),
            known_scopes=set,
            pending=PendingLogins(engine),
            clients=ClientStore(engine),
            refresh=RefreshTokenStore(engine, ttl_s=60, max_s=600),
        )
        app = FastAPI()
        app.include_router(oauth_router(auth))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
            yield http

    return start


async def test_open_registration_is_advertised_beside_metadata_documents(server: Server) -> None:
    async with server(RegistrationSettings()) as http:
        metadata = (await http.get("/.well-known/oauth-authorization-server")).json()
        assert metadata["registration_endpoint"] == f"{BASE}/oauth/register"
        assert metadata["client_id_metadata_document_supported"] is True
        assert "refresh_token" in metadata["grant_types_supported"]
        assert metadata["revocation_endpoint"] == f"{BASE}/oauth/revoke"
        answer = await http.post("/oauth/register", json=METADATA)
        assert answer.status_code == 201, answer.text
        assert answer.json()["token_endpoint_auth_method"] == "none"


async def test_registration_switched_off_has_no_endpoint(server: Server) -> None:
    async with server(RegistrationSettings(mode="off")) as http:
        metadata = (await http.get("/.well-known/oauth-authorization-server")).json()
        assert "registration_endpoint" not in metadata
        assert (await http.post("/oauth/register", json=METADATA)).status_code in (404, 405)


async def test_token_mode_needs_a_known_initial_access_token(server: Server) -> None:
    settings = RegistrationSettings(mode="token", initial_access_tokens_sha256=[hash_secret("let-me-in")])
    async with server(settings) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic let-me-in"}):
            refused = await http.post("/oauth/register", json=METADATA, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "invalid_token"
        allowed = await http.post(
            "/oauth/register", json=METADATA, headers={"authorization": "Bearer let-me-in"}
        )
        assert allowed.status_code == 201, allowed.text


async def test_registrations_stop_at_the_cap_on_live_clients(server: Server) -> None:
    async with server(RegistrationSettings(max_clients=2)) as http:
        for _ in range(2):
            assert (await http.post("/oauth/register", json=METADATA)).status_code == 201
        refused = await http.post("/oauth/register", json=METADATA)
        assert refused.status_code == 403 and "limit" in refused.json()["error_description"]


async def test_one_address_registers_at_most_its_rate(server: Server) -> None:
    async with server(RegistrationSettings(per_address_per_minute=3)) as http:
        answers = [(await http.post("/oauth/register", json=METADATA)).status_code for _ in range(4)]
        assert answers == [201, 201, 201, 429]


def test_the_rate_limit_forgets_after_a_minute() -> None:
    limiter = RegistrationLimiter(1)
    assert limiter.allow("a", now=0) and not limiter.allow("a", now=59) and limiter.allow("b", now=59)
    assert limiter.allow("a", now=60.5)


def test_two_parties_racing_on_one_refresh_token_cannot_both_win(tmp_path: Path) -> None:
    store = RefreshTokenStore(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"), ttl_s=60, max_s=600)
    token = store.start(client_id="c", subject="alice", scope="", resource=f"{BASE}/mcp")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def use() -> None:
        barrier.wait()
        try:
            login = store.take(token, "c")
            store.rotate(login.id)
            outcomes.append("won")
        except RefreshRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert outcomes.count("won") <= 1 and len(outcomes) == 4
    with pytest.raises(RefreshRefused):  # the reuse revoked the login
        store.take(token, "c")


def test_a_refresh_token_is_only_its_clients(tmp_path: Path) -> None:
    store = RefreshTokenStore(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"), ttl_s=60, max_s=600)
    token = store.start(client_id="c", subject="alice", scope="", resource=f"{BASE}/mcp")
    with pytest.raises(RefreshRefused, match="unknown"):
        store.take(token, "another")
    assert store.take(token, "c").subject == "alice"  # the other client's attempt did not burn it
