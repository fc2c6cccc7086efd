"""LLM routes get their upstream credential from the credentials stage, as MCP upstreams do.

Real parts: the official openai client, in-process against the gateway's LLM ingress and pipeline;
the OpenAI-compatible fixture on 127.0.0.1 (which records every request and is also a
client-credentials token endpoint); the authlib STS fixture on 127.0.0.1 for RFC 8693 exchange.
The stage runs on a test clock, so its renewal rule (not any other) decides when a token is renewed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette

from agentgw.call import Call, Principal, Reply
from agentgw.errors import Unauthenticated
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.credentials import Credentials, MemoryTokenCache
from agentgw.ingress.llm import LlmIngress
from agentgw.oauth.exchange import TOKEN_EXCHANGE
from agentgw.pipeline import CallNext, ordered
from agentgw.registry.llm import LlmRouteSpec, token_upstreams
from agentgw.registry.secrets import Secrets, SecretSource
from agentgw.settings import PACKAGE_POLICIES
from conformance.fixtures import sts
from conformance.fixtures.launch import free_port, start_process
from conformance.fixtures.openai_upstream import start_openai_upstream_sync

STS_SECRET = "sts-client-secret-41d2"
CC_SECRET = "cc-client-secret-9b0e"
STATIC_KEY = "sk-static-route-77aa"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
# What the fixture's `expires_in` says, and when the stage's rule renews such a token.
TOKEN_LIFETIME_S = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StsTokens:
    """The identity stage's verifier for the STS's users (the identity stage is not under test here:
    the signature is the STS's to check when it exchanges the token)."""

    async def verify(self, credential: str, resource: str) -> Principal:
        try:
            claims = jwt.decode(credential, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthenticated("not a token") from exc
        scopes = frozenset(str(claims.get("scope", "")).split())
        return Principal(subject=f"user:{claims['sub']}", scopes=scopes)


@dataclass
class Seen:
    """Audit slot: how each call's credential was obtained, as the stage told the call."""

    modes: list[tuple[str, str | None]] = field(default_factory=list)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        try:
            return await call_next(call)
        finally:
            self.modes.append((call.upstream, call.credential_mode))


async def _free(call: Call, call_next: CallNext) -> Reply:
    return await call_next(call)


@dataclass
class Fixtures:
    upstream: str
    sts: str


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixtures]:
    tmp = tmp_path_factory.mktemp("llm-sts")
    with start_openai_upstream_sync() as upstream:
        port = free_port()
        config = {
            "clients": [
                {
                    "client_id": "gateway",
                    "secret": STS_SECRET,
                    "audiences": [f"{upstream}/v1"],
                    "grant_types": ["client_credentials", TOKEN_EXCHANGE],
                }
            ]
        }
        (tmp / "sts.json").write_text(json.dumps(config))
        with start_process(sts.command(port, str(tmp / "sts.json")), port) as process:
            yield Fixtures(upstream, process.url)


@pytest.fixture(autouse=True)
def fresh(fixtures: Fixtures) -> None:
    for base in (fixtures.upstream, fixtures.sts):
        httpx.post(f"{base}/_fixture/reset").raise_for_status()


def routes(fixtures: Fixtures) -> list[LlmRouteSpec]:
    api = f"{fixtures.upstream}/v1"
    client_credentials = {
        "mode": "client_credentials",
        "token_url": f"{fixtures.upstream}/_fixture/token",
        "client_id": "gw",
        "secret": "cc",
    }
    exchange = {
        "mode": "token_exchange",
        "token_url": f"{fixtures.sts}/token",
        "client": {"client_id": "gateway", "secret": "sts"},
        "scopes": ["llm"],
    }
    specs = [
        {"name": "cc", "model": "fixture-chat", "credential": client_credentials},
        {"name": "te", "model": "fixture-chat", "credential": exchange},
        # Fails with a 500 (the provider got it, with the static key), then falls back to `cc`.
        {
            "name": "flaky",
            "model": "fail-model",
            "credential": {"mode": "static", "secret": "static"},
            "fallbacks": ["cc"],
        },
    ]
    return [LlmRouteSpec.model_validate({"base_url": api} | spec) for spec in specs]


@dataclass
class Gateway:
    app: Starlette
    stage: Credentials
    clock: Clock
    seen: Seen

    def client(self, token: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gw/v1",
            api_key=token,
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app)),
            max_retries=0,
        )


@pytest.fixture
async def gateway(fixtures: Fixtures, tmp_path: Path) -> AsyncIterator[Gateway]:
    files = {"cc": CC_SECRET, "sts": STS_SECRET, "static": STATIC_KEY}
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    secrets = Secrets({name: SecretSource(file=tmp_path / name) for name in files})
    specs: Sequence[LlmRouteSpec] = routes(fixtures)
    served = token_upstreams(specs)
    clock, seen = Clock(), Seen()
    stage = Credentials(models=served.get, secrets=secrets, clock=clock)
    stage.prepare(served.values())
    authorizer = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, ["p, user:alice, llm:*, *, allow"])
    pipeline = ordered(
        audit=seen,
        authenticate=Authenticate(StsTokens(), allow_anonymous=False, base_url="http://gw"),
        authorize=Authorize(authorizer),
        budget=_free,
        credentials=stage,
    )
    ingress = LlmIngress.build(specs, pipeline, max_body_bytes=64 * 1024)
    try:
        yield Gateway(Starlette(routes=ingress.routes()), stage, clock, seen)
    finally:
        await ingress.aclose()
        await stage.aclose()


def received(fixtures: Fixtures) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{fixtures.upstream}/_fixture/received").json()
    return records


def user_token(fixtures: Fixtures, subject: str = "alice") -> str:
    answer = httpx.post(
        f"{fixtures.sts}/_fixture/mint", json={"sub": subject, "aud": "http://gw/v1", "scope": "llm"}
    )
    token: str = answer.raise_for_status().json()["access_token"]
    return token


async def test_client_credentials_come_from_the_stage_once_and_renew_by_its_rule(
    gateway: Gateway, fixtures: Fixtures
) -> None:
    client = gateway.client(user_token(fixtures))
    for _ in range(2):
        answer = await client.chat.completions.create(model="cc", messages=HELLO)
        assert answer.choices[0].message.content == "echo: hello there"
    records = received(fixtures)
    assert [r["path"] for r in records if r["path"] == "/_fixture/token"] == ["/_fixture/token"]
    chats = [r["authorization"] for r in records if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 2 and len(set(chats)) == 1 and chats[0].startswith("Bearer cc-gw-")
    # The token was the stage's: fetched into its cache once, then found there.
    cache = gateway.stage.cache
    assert isinstance(cache, MemoryTokenCache)
    lookups = {k: v for k, v in cache.lookups.items() if k[0] == "llm:cc"}
    assert lookups == {("llm:cc", "miss"): 1, ("llm:cc", "hit"): 1}
    assert gateway.seen.modes == [("cc", "client_credentials")] * 2
    # Past the stage's renewal point on the stage's clock: the next call gets a fresh token.
    gateway.clock.now += TOKEN_LIFETIME_S - 29
    await client.chat.completions.create(model="cc", messages=HELLO)
    records = received(fixtures)
    assert len([r for r in records if r["path"] == "/_fixture/token"]) == 2
    chats = [r["authorization"] for r in records if r["path"] == "/v1/chat/completions"]
    assert chats[2] != chats[0] and chats[2].startswith("Bearer cc-gw-")


async def test_token_exchange_gives_the_provider_a_token_for_the_caller_never_the_callers_own(
    gateway: Gateway, fixtures: Fixtures
) -> None:
    caller = user_token(fixtures)
    client = gateway.client(caller)
    for _ in range(2):
        await client.chat.completions.create(model="te", messages=HELLO)
    sent = [r["authorization"] for r in received(fixtures) if r["path"] == "/v1/chat/completions"]
    assert len(sent) == 2 and len(set(sent)) == 1
    assert caller not in sent[0]
    claims = jwt.decode(sent[0].removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["act"]["sub"] == "gateway"
    requests = httpx.get(f"{fixtures.sts}/_fixture/requests").json()
    exchanges = [r for r in requests if r["grant_type"] == TOKEN_EXCHANGE]
    assert len(exchanges) == 1 and exchanges[0]["resource"] == f"{fixtures.upstream}/v1"
    assert exchanges[0]["subject"] == "alice" and exchanges[0]["has_actor_token"]
    assert gateway.seen.modes == [("te", "token_exchange")] * 2


async def test_a_fallback_route_is_sent_its_own_credential_from_the_stage(
    gateway: Gateway, fixtures: Fixtures
) -> None:
    answer = await gateway.client(user_token(fixtures)).chat.completions.create(model="flaky", messages=HELLO)
    assert answer.model == "flaky"
    chats = [
        (r["body"]["model"], r["authorization"])
        for r in received(fixtures)
        if r["path"] == "/v1/chat/completions"
    ]
    assert chats[0] == ("fail-model", f"Bearer {STATIC_KEY}")
    assert chats[1][0] == "fixture-chat" and chats[1][1].startswith("Bearer cc-gw-")
    assert len(chats) == 2
    # The audit record names the route that served, and how its credential was obtained.
    assert gateway.seen.modes == [("cc", "client_credentials")]
