"""Authorization codes and pending sign-ins in the database (agentgw/oauth/pending.py): stored as
digests, used once even when nodes race for them, expired and swept, bounded; and several built-in
authorization servers on one database, in-process, finishing each other's logins. On SQLite and on
PostgreSQL (a database of the test's own)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, text

from agentgw.oauth.config import BuiltinAuthServer, BuiltinClient, BuiltinUser
from agentgw.oauth.jwks import LocalKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.pending import IssuedCode, Pending, PendingLogins
from agentgw.oauth.refresh import RefreshTokenStore
from agentgw.oauth.server import AuthorizationServer, hash_password, oauth_router
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from agentgw.storage import make_engine
from agentgw.storage.db import DatabaseSettings
from tests.oauth.test_server import pkce
from tests.support.postgres import fresh_database

BASE = "http://127.0.0.1:8080"
REDIRECT = "http://127.0.0.1:9999/cb"
ISSUED = IssuedCode("app", REDIRECT, "read", "alice", ["dev"], f"{BASE}/mcp", "c" * 43, "S256")
NODES = 3


class Clock:
    """The wall clock the nodes share, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Engine]]:
    """Makes engines on one database, each one node's own connection pool."""
    made: list[Engine] = []

    def engine_for(url: str) -> Callable[[], Engine]:
        def make() -> Engine:
            made.append(make_engine(url, DatabaseSettings()))
            return made[-1]

        return make

    try:
        if request.param == "sqlite":
            yield engine_for(f"sqlite:///{tmp_path / 'agentgw.db'}")
        else:
            with fresh_database() as name:
                yield engine_for(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
                for engine in made:
                    engine.dispose()
    finally:
        for engine in made:
            engine.dispose()


def rows(engine: Engine, table: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(f"SELECT * FROM {table}"))]  # noqa: S608  (a constant)


def test_a_code_is_kept_as_its_digest_and_taken_once(engines: Callable[[], Engine]) -> None:
    store = PendingLogins(engines())
    store.save_code("the-code", ISSUED, 300)
    stored = rows(store.engine, "oauth_code")
    assert len(stored) == 1
    assert hashlib.sha256(b"the-code").hexdigest() in stored[0]
    assert "the-code" not in repr(stored)
    assert store.take_code("the-code") == ISSUED
    assert store.take_code("the-code") is None
    assert rows(store.engine, "oauth_code") == []
    assert store.take_code("x" * 10_000) is None


def test_of_many_nodes_racing_for_one_code_or_state_exactly_one_gets_it(
    engines: Callable[[], Engine],
) -> None:
    nodes = [PendingLogins(engines()) for _ in range(NODES)]
    racers = 4 * NODES
    for round_ in range(5):
        code, state = f"code-{round_}", f"state-{round_}"
        nodes[0].save_code(code, ISSUED, 300)
        nodes[0].save_sign_in(state, "app", Pending({"client_id": ["app"]}, "n", "v"), 600)
        start = threading.Barrier(racers)

        def race(
            i: int, code: str = code, state: str = state, start: threading.Barrier = start
        ) -> tuple[bool, bool]:
            node = nodes[i % NODES]
            start.wait()
            return node.take_code(code) is not None, node.take_sign_in(state) is not None

        with ThreadPoolExecutor(racers) as pool:
            won = list(pool.map(race, range(racers)))
        assert sum(c for c, _ in won) == 1, won
        assert sum(s for _, s in won) == 1, won


def test_an_expired_code_or_sign_in_is_refused_and_swept(engines: Callable[[], Engine]) -> None:
    clock = Clock()
    store = PendingLogins(engines(), clock=clock)
    store.save_code("old", ISSUED, 300)
    store.save_code("older", ISSUED, 300)
    store.save_sign_in("old-state", "app", Pending({}, "n", "v"), 600)
    clock.now += 300
    assert store.take_code("old") is None  # expired: refused, and gone
    assert store.take_sign_in("old-state") is not None  # not yet
    store.save_sign_in("expiring", "app", Pending({}, "n", "v"), 600)
    clock.now += 600
    assert store.take_sign_in("expiring") is None
    # Writing sweeps what expired: "older" was never taken.
    store.save_code("new", ISSUED, 300)
    store.save_sign_in("new-state", "app", Pending({}, "n", "v"), 600)
    assert len(rows(store.engine, "oauth_code")) == 1
    assert len(rows(store.engine, "oauth_pending_sign_in")) == 1


def test_pending_sign_ins_are_bounded_per_client_and_in_all(engines: Callable[[], Engine]) -> None:
    clock = Clock()
    store = PendingLogins(engines(), max_pending=5, max_pending_per_client=3, clock=clock)
    pending = Pending({"client_id": ["a"]}, "n", "v")
    assert all(store.save_sign_in(f"a{i}", "a", pending, 600) for i in range(3))
    assert not store.save_sign_in("a3", "a", pending, 600)  # this client's share is full
    assert all(store.save_sign_in(f"b{i}", "b", pending, 600) for i in range(2))
    assert not store.save_sign_in("c0", "c", pending, 600)  # the table is full
    assert len(rows(store.engine, "oauth_pending_sign_in")) == 5
    assert store.take_sign_in("b0") is not None  # a finished sign-in frees its place
    assert store.save_sign_in("c0", "c", pending, 600)
    clock.now += 600  # and so do expired ones
    assert store.save_sign_in("a3", "a", pending, 600)


# --- several authorization servers (nodes) on one database, through their HTTP endpoints ---


@pytest.fixture
async def nodes(
    engines: Callable[[], Engine], tmp_path: Path
) -> AsyncIterator[tuple[list[httpx.AsyncClient], Clock]]:
    """NODES built-in authorization servers, each with its own engine, sharing keys and a clock."""
    keys = SigningKeys(tmp_path / "keys.json")
    config = BuiltinAuthServer(
        clients=[BuiltinClient(client_id="app", redirect_uris=[REDIRECT])],
        users=[BuiltinUser(name="alice", password_hash=hash_password("pw"), roles=["dev"])],
    )
    clock = Clock()
    clients = []
    for _ in range(NODES):
        engine = engines()
        server = AuthorizationServer(
            BASE,
            config,
            keys,
            verifier=JwtVerifier([TrustedIssuer(BASE, LocalKeySet(keys))]),
            known_scopes=lambda: {"read"},
            pending=PendingLogins(engine, clock=clock),
            refresh=RefreshTokenStore(engine, ttl_s=600, max_s=3600),
        )
        app = FastAPI()
        app.include_router(oauth_router(server))
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE))
    try:
        yield clients, clock
    finally:
        for client in clients:
            await client.aclose()


async def sign_in(node: httpx.AsyncClient, challenge: str) -> str:
    params = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    answer = await node.post("/oauth/authorize", data=params | {"username": "alice", "password": "pw"})
    assert answer.status_code == 302, answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]


def redeem(node: httpx.AsyncClient, code: str, verifier: str) -> asyncio.Future[httpx.Response]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "app",
        "code_verifier": verifier,
    }
    return asyncio.ensure_future(node.post("/oauth/token", data=form))


async def test_a_code_issued_by_one_node_is_redeemed_at_another_and_its_refresh_at_a_third(
    nodes: tuple[list[httpx.AsyncClient], Clock],
) -> None:
    (a, b, c), _ = nodes
    verifier, challenge = pkce()
    code = await sign_in(a, challenge)
    tokens = await redeem(b, code, verifier)
    assert tokens.status_code == 200, tokens.text
    refreshed = await c.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens.json()["refresh_token"],
            "client_id": "app",
        },
    )
    assert refreshed.status_code == 200, refreshed.text
    again = await redeem(a, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_a_code_redeemed_at_two_other_nodes_at_once_works_once(
    nodes: tuple[list[httpx.AsyncClient], Clock],
) -> None:
    (a, b, c), _ = nodes
    for _ in range(5):
        verifier, challenge = pkce()
        code = await sign_in(a, challenge)
        answers = await asyncio.gather(redeem(b, code, verifier), redeem(c, code, verifier))
        assert sorted(answer.status_code for answer in answers) == [200, 400], [a.text for a in answers]
        refused = next(answer for answer in answers if answer.status_code == 400)
        assert refused.json()["error"] == "invalid_grant"


async def test_an_expired_code_is_refused_on_every_node(nodes: tuple[list[httpx.AsyncClient], Clock]) -> None:
    (a, b, _), clock = nodes
    verifier, challenge = pkce()
    code = await sign_in(a, challenge)
    clock.now += 301
    answer = await redeem(b, code, verifier)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


async def test_an_oversized_authorization_request_is_refused(
    nodes: tuple[list[httpx.AsyncClient], Clock],
) -> None:
    (a, _, _), _ = nodes
    _, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "state": "s" * 9000,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "username": "alice",
        "password": "pw",
    }
    answer = await a.post("/oauth/authorize", data=params)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_request",
        "error_description": "the authorization request is too large",
    }


def test_a_sweep_deletes_a_batch_of_expired_rows_per_write(engines: Callable[[], Engine]) -> None:
    clock = Clock()
    store = PendingLogins(engines(), clock=clock)
    for i in range(150):
        store.save_code(f"stale-{i}", ISSUED, 300)
    clock.now += 300
    store.save_code("fresh-1", ISSUED, 300)
    assert len(rows(store.engine, "oauth_code")) == 150 - 100 + 1
    store.save_code("fresh-2", ISSUED, 300)
    assert len(rows(store.engine, "oauth_code")) == 2
    assert store.take_code("fresh-1") == ISSUED
