"""The token endpoint redeeming authorization codes, in-process (`python -m bench.code_redemption`).

One built-in authorization server behind `httpx.ASGITransport`, on SQLite (a file) or on a fresh
PostgreSQL database, with the refresh-token store the gateway always gives it. Each round signs a
user in (untimed: the password check is a slow hash on purpose) and then times one code redemption
(`POST /oauth/token`, grant `authorization_code`, PKCE), one at a time. Prints the median and the
90th percentile in milliseconds.

`--part store` times only what a code costs the database (this branch's `PendingLogins`: saving
one at the authorization endpoint, taking it at the token endpoint), without HTTP or authlib.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import inspect
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine

from agentgw.oauth.config import BuiltinAuthServer, BuiltinClient, BuiltinUser
from agentgw.oauth.jwks import LocalKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.refresh import RefreshTokenStore
from agentgw.oauth.server import AuthorizationServer, hash_password, oauth_router
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from agentgw.storage.db import DatabaseSettings, make_engine
from tests.support.postgres import fresh_database

BASE = "http://127.0.0.1:8080"
REDIRECT = "http://127.0.0.1:9999/cb"


@contextlib.contextmanager
def _engine(kind: str, directory: Path) -> Iterator[Engine]:
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{directory / 'agentgw.db'}")
        yield engine
        engine.dispose()
        return
    with fresh_database(prefix="agentgw_bench") as name:
        engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", DatabaseSettings())
        yield engine
        engine.dispose()


def _server(engine: Engine, directory: Path) -> AuthorizationServer:
    keys = SigningKeys(directory / "keys.json")
    config = BuiltinAuthServer(
        clients=[BuiltinClient(client_id="app", redirect_uris=[REDIRECT])],
        users=[BuiltinUser(name="alice", password_hash=hash_password("pw"), roles=["dev"])],
    )
    extra: dict[str, Any] = {}
    if "pending" in inspect.signature(AuthorizationServer).parameters:  # this branch's shared codes
        from agentgw.oauth.pending import PendingLogins

        extra["pending"] = PendingLogins(engine)
    return AuthorizationServer(
        BASE,
        config,
        keys,
        verifier=JwtVerifier([TrustedIssuer(BASE, LocalKeySet(keys))]),
        known_scopes=lambda: {"read"},
        refresh=RefreshTokenStore(engine, ttl_s=3600, max_s=86400),
        **extra,
    )


async def _round(http: httpx.AsyncClient) -> float:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    answer = await http.post("/oauth/authorize", data=params | {"username": "alice", "password": "pw"})
    code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "app",
        "code_verifier": verifier,
    }
    started = time.perf_counter()
    tokens = await http.post("/oauth/token", data=form)
    elapsed = time.perf_counter() - started
    tokens.raise_for_status()
    return elapsed


async def measure(kind: str, rounds: int) -> tuple[float, float]:
    """(median, p90) of one code redemption, in milliseconds."""
    with tempfile.TemporaryDirectory() as tmp, _engine(kind, Path(tmp)) as engine:
        app = FastAPI()
        app.include_router(oauth_router(_server(engine, Path(tmp))))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
            for _ in range(10):  # warm up: the pool's connections, the first JWT signature
                await _round(http)
            times = sorted([await _round(http) for _ in range(rounds)])
    return statistics.median(times) * 1000, times[int(len(times) * 0.9)] * 1000


def measure_store(kind: str, rounds: int) -> None:
    """Print the median and p90 of saving and of taking one code, in milliseconds."""
    from agentgw.oauth.pending import IssuedCode, PendingLogins

    issued = IssuedCode("app", REDIRECT, "read", "alice", ["dev"], f"{BASE}/mcp", "c" * 43, "S256")
    with tempfile.TemporaryDirectory() as tmp, _engine(kind, Path(tmp)) as engine:
        store = PendingLogins(engine)
        timed: dict[str, list[float]] = {"save_code": [], "take_code": []}
        for i in range(rounds + 20):  # the first 20 warm the pool up
            code = secrets.token_urlsafe(36)
            started = time.perf_counter()
            store.save_code(code, issued, 300)
            saved = time.perf_counter()
            assert store.take_code(code) == issued
            if i >= 20:
                timed["save_code"].append(saved - started)
                timed["take_code"].append(time.perf_counter() - saved)
    for name, times in timed.items():
        times.sort()
        median, p90 = statistics.median(times) * 1000, times[int(len(times) * 0.9)] * 1000
        print(f"{kind}: {name} median {median:.2f} ms, p90 {p90:.2f} ms ({rounds} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.code_redemption", description=__doc__)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--part", choices=("token", "store"), default="token")
    args = parser.parse_args()
    if args.part == "store":
        measure_store(args.database, args.rounds)
        return
    median, p90 = asyncio.run(measure(args.database, args.rounds))
    print(f"{args.database}: code redemption median {median:.2f} ms, p90 {p90:.2f} ms ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
