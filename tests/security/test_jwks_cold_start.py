"""A burst of valid calls right after start (or right after the IdP rotates its key) all succeed.

The attack (or just bad luck): 20 concurrent calls against an external issuer right after start; 19
were refused with "the signing keys of issuer ... cannot be fetched", because the key set counted as
fetched as soon as the first caller started fetching, and those arriving during the fetch did not
wait for it. Here a real IdP on loopback holds its JWKS answer until the rest of the burst arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentgw.oauth.jwks import RemoteKeySet
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from tests.support.servers import LocalServer

BURST = 30
RESOURCE = "http://gw.test/mcp/github"


class SlowIdp:
    """An issuer whose JWKS endpoint answers only once the test releases it."""

    def __init__(self) -> None:
        self.server = LocalServer()
        self.issuer = f"{self.server.url}/realm"
        self.key = rsa.generate_private_key(65537, 2048)
        self.kid = "k1"
        self.metadata_fetches = 0
        self.jwks_fetches = 0
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server/realm", self.metadata),
                Route("/jwks", self.jwks),
            ]
        )

    async def metadata(self, request: Request) -> JSONResponse:
        self.metadata_fetches += 1
        return JSONResponse({"issuer": self.issuer, "jwks_uri": f"{self.server.url}/jwks"})

    async def jwks(self, request: Request) -> JSONResponse:
        self.jwks_fetches += 1
        self.asked.set()
        await self.release.wait()
        public: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**public, "kid": self.kid}]})

    def token(self, subject: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": RESOURCE, "iat": now, "exp": now + 300}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture
async def idp() -> AsyncIterator[SlowIdp]:
    idp = SlowIdp()
    async with idp.server.serve(idp.app):
        yield idp


async def burst(verifier: JwtVerifier, idp: SlowIdp, prefix: str) -> list[str]:
    """One verification starts the fetch; the rest of the burst arrives while it is in progress."""
    tokens = [idp.token(f"{prefix}{i}") for i in range(BURST)]
    async with asyncio.timeout(20):
        first = asyncio.create_task(verifier.verify(tokens[0], RESOURCE))
        await idp.asked.wait()
        rest = [asyncio.create_task(verifier.verify(token, RESOURCE)) for token in tokens[1:]]
        await asyncio.sleep(0)  # one turn of the loop: each runs until it waits for the keys, or ends
        idp.release.set()
        principals = await asyncio.gather(first, *rest, return_exceptions=True)
    return [p.subject if not isinstance(p, BaseException) else repr(p) for p in principals]


async def test_a_burst_of_valid_calls_right_after_start_all_succeed_with_one_fetch(idp: SlowIdp) -> None:
    async with httpx.AsyncClient(follow_redirects=False) as http:
        keys = RemoteKeySet(idp.issuer, None, http, min_refresh_s=30, max_age_s=3600)
        verifier = JwtVerifier([TrustedIssuer(idp.issuer, keys)])
        subjects = await burst(verifier, idp, "cold")
    assert subjects == [f"user:cold{i}" for i in range(BURST)]
    assert (idp.metadata_fetches, idp.jwks_fetches) == (1, 1)


async def test_a_burst_right_after_the_idp_rotates_its_key_all_succeed_with_one_fetch(idp: SlowIdp) -> None:
    async with httpx.AsyncClient(follow_redirects=False) as http:
        keys = RemoteKeySet(idp.issuer, None, http, min_refresh_s=30, max_age_s=3600)
        verifier = JwtVerifier([TrustedIssuer(idp.issuer, keys)])
        idp.release.set()
        assert (await verifier.verify(idp.token("warm"), RESOURCE)).subject == "user:warm"
        idp.key, idp.kid = rsa.generate_private_key(65537, 2048), "k2"  # the IdP rotates
        idp.asked.clear()
        idp.release.clear()
        keys._fetched_at = time.monotonic() - 31  # ... and the refetch rate bound has passed
        subjects = await burst(verifier, idp, "rotated")
    assert subjects == [f"user:rotated{i}" for i in range(BURST)]
    assert idp.jwks_fetches == 2
