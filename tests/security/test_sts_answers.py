"""What a token service answers is checked before it is forwarded or cached (RFC 8693 token exchange).

The attack (or a broken STS): a token for another subject, with more scopes than were asked for, or
living far longer than the caller's own token, was forwarded upstream and cached for its whole
lifetime. And a failed token request read as "actor token request" whatever had failed. Here the
credentials stage talks over real HTTP to the authlib STS fixture on loopback, told to misbehave;
the terminal stands for the upstream and records what would be forwarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from agentgw.call import Call, Principal, Reply
from agentgw.errors import CredentialError
from agentgw.filters.credentials import Credentials
from agentgw.oauth.exchange import TOKEN_EXCHANGE
from agentgw.registry.models import McpServerSpec
from agentgw.registry.secrets import Secrets, SecretSource
from conformance.fixtures.sts import build_app
from tests.support.servers import LocalServer, unused_url

SECRET = "sts-client-secret-4b1e"
UPSTREAM = "http://up.test/mcp"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal:
    """The upstream: records the Authorization header each call would carry."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def __call__(self, call: Call) -> Reply:
        self.seen.append(call.upstream_authorization)
        return Reply(payload="ok")


@dataclass
class Sts:
    url: str
    http: httpx.AsyncClient

    async def behave(self, **behaviour: Any) -> None:
        (await self.http.post(f"{self.url}/_fixture/behaviour", json=behaviour)).raise_for_status()

    async def caller(self, sub: str, ttl_s: int = 600) -> Principal:
        """A caller with a token the STS issued (as the IdP would at login)."""
        answer = await self.http.post(
            f"{self.url}/_fixture/mint",
            json={"sub": sub, "aud": "http://gw.test/mcp/pay", "scope": "pay.read pay.write", "ttl_s": ttl_s},
        )
        scopes = frozenset({"pay.read", "pay.write"})
        return Principal(subject=f"user:{sub}", scopes=scopes, credential=answer.json()["access_token"])

    async def exchanges(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = (await self.http.get(f"{self.url}/_fixture/requests")).json()
        return [r for r in records if r["grant_type"] == TOKEN_EXCHANGE]


@pytest.fixture
async def sts(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sts]:
    monkeypatch.setenv("AGW_SEC_STS_SECRET", SECRET)
    server = LocalServer()
    config = {
        "clients": [
            {
                "client_id": "gateway",
                "secret": SECRET,
                "audiences": [UPSTREAM],
                "grant_types": ["client_credentials", TOKEN_EXCHANGE],
            }
        ]
    }
    async with server.serve(build_app(server.port, config)), httpx.AsyncClient() as http:
        yield Sts(server.url, http)


def exchange(sts: Sts, **overrides: Any) -> McpServerSpec:
    credential = {
        "mode": "token_exchange",
        "token_url": f"{sts.url}/token",
        "client": {"client_id": "gateway", "secret": "sts-secret"},
        "scopes": ["pay.read"],
    } | overrides
    return McpServerSpec.model_validate({"name": "pay", "url": UPSTREAM, "credential": credential})


@pytest.fixture
async def stage_for(sts: Sts) -> AsyncIterator[Any]:
    made: list[Credentials] = []

    def build(spec: McpServerSpec, clock: Clock | None = None) -> Credentials:
        secrets = Secrets({"sts-secret": SecretSource(env="AGW_SEC_STS_SECRET")})
        stage = Credentials(
            {spec.name: spec}.get, http=httpx.AsyncClient(), clock=clock or Clock(), secrets=secrets
        )
        made.append(stage)
        return stage

    yield build
    for stage in made:
        await stage.aclose()


def call_by(who: Principal) -> Call:
    return Call(
        protocol="mcp",
        action="call",
        resource="mcp:pay/whoami",
        upstream="pay",
        method="tools/call",
        principal=who,
    )


@pytest.mark.parametrize(
    ("misbehaviour", "why"),
    [
        ("other_subject", "the token does not name the caller as its subject"),
        ("wider_scopes", "the token has scopes that were not asked for: admin"),
    ],
)
async def test_a_token_for_someone_else_or_with_more_scopes_is_refused_not_forwarded_not_cached(
    sts: Sts, stage_for: Any, misbehaviour: str, why: str
) -> None:
    stage, terminal = stage_for(exchange(sts)), Terminal()
    alice = await sts.caller("alice")
    await sts.behave(exchange=misbehaviour, times=1)
    with pytest.raises(CredentialError) as refused:
        await stage(call_by(alice), terminal)
    assert refused.value.message == (
        f"upstream 'pay': the subject token exchange failed: the token service's answer was refused: {why}"
    )
    assert terminal.seen == []
    await stage(call_by(alice), terminal)  # the STS behaves again: nothing bad was cached
    assert len(await sts.exchanges()) == 2 and len(terminal.seen) == 1


async def test_a_long_lived_exchanged_token_is_cached_no_longer_than_the_callers_token_lives(
    sts: Sts, stage_for: Any
) -> None:
    clock = Clock()
    stage, terminal = stage_for(exchange(sts), clock), Terminal()
    alice = await sts.caller("alice", ttl_s=120)
    await sts.behave(exchange="long_lived")  # 30 days, and it says so
    await stage(call_by(alice), terminal)
    clock.now += 60  # the caller's token still lives: the exchanged one is reused
    await stage(call_by(alice), terminal)
    assert len(await sts.exchanges()) == 1
    clock.now += 61  # the caller's token has expired: the exchanged one must not outlive it
    await stage(call_by(alice), terminal)
    assert len(await sts.exchanges()) == 2


@pytest.mark.parametrize(
    ("spec", "behaviour", "message"),
    [
        (
            {},
            {"client_credentials": "invalid_client"},
            "the actor token request (client credentials) failed: the token service answered HTTP 400 "
            "invalid_client",
        ),
        (
            {},
            {"exchange": "invalid_grant"},
            "the subject token exchange failed: the token service answered HTTP 400 invalid_grant",
        ),
        (
            {"actor_token": False},
            {"exchange": "server_error"},
            "the subject token exchange failed: the token service answered HTTP 500 server_error",
        ),
        (
            {"mode": "client_credentials"},
            {"client_credentials": "unauthorized_client"},
            "the client credentials grant failed: the token service answered HTTP 400 unauthorized_client",
        ),
        (
            {"token_url": f"{unused_url()}/token"},
            {},
            "the actor token request (client credentials) failed: the token service is unreachable "
            "(ConnectError)",
        ),
    ],
)
async def test_a_failed_token_request_says_which_request_failed_and_why_never_the_secret(
    sts: Sts, stage_for: Any, spec: dict[str, Any], behaviour: dict[str, Any], message: str
) -> None:
    stage, terminal = stage_for(exchange(sts, **spec)), Terminal()
    await sts.behave(**behaviour)
    with pytest.raises(CredentialError) as failed:
        await stage(call_by(await sts.caller("bob")), terminal)
    assert failed.value.message == f"upstream 'pay': {message}"
    assert SECRET not in repr(failed.value.__dict__) and terminal.seen == []
