"""The credentials stage in-process: each mode against a recording token endpoint (httpx.MockTransport)
or the authlib STS fixture (ASGI), the per-caller cache with single flight and expiry, the 401 retry,
and the refusals that must never fall back to another mode."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from agentgw.call import ANONYMOUS, Call, Principal, Reply
from agentgw.errors import CredentialError, UpstreamUnauthorized
from agentgw.filters.credentials import (
    CacheKey,
    CredentialConfigError,
    Credentials,
    IssuedCredential,
    MemoryTokenCache,
    TokenService,
    caller_key,
    chain_of,
    refresh_at,
    scopes_for,
)
from agentgw.oauth.exchange import ACCESS_TOKEN_TYPE, ID_JAG_TOKEN_TYPE, JWT_BEARER, TOKEN_EXCHANGE
from agentgw.registry.models import McpServerSpec
from agentgw.registry.secrets import Secrets, SecretSource
from conformance.fixtures.sts import build_app as sts_app

UPSTREAM = "http://up.test/mcp"
TOKEN_URL = "http://sts.test/token"
SECRET = "s3cret-client-value"


def user_token(sub: str = "alice", **claims: Any) -> str:
    # Unsigned-looking but well-formed: the stage never verifies the caller's token (identity did).
    return jwt.encode({"sub": sub, "aud": "http://gw.test/mcp", **claims}, "k" * 32, algorithm="HS256")


def principal(token: str | None = None, subject: str = "user:alice") -> Principal:
    return Principal(subject=subject, credential=token if token is not None else user_token())


def mcp_call(upstream: str = "pay", resource: str = "mcp:pay/whoami", who: Principal | None = None) -> Call:
    return Call(
        protocol="mcp",
        action="call",
        resource=resource,
        upstream=upstream,
        method="tools/call",
        principal=who or principal(),
    )


@dataclass
class FakeSts:
    """A token endpoint that records each form and answers with a numbered token (or a refusal)."""

    answers: list[httpx.Response | Exception] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)
    expires_in: float | None = 3600
    gate: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    issued: int = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.forms.append(form)
        self.headers.append(request.headers)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        self.issued += 1
        # As a real STS: the exchanged token names the subject token's subject.
        subject = form.get("subject_token")
        sub = jwt.decode(subject, options={"verify_signature": False})["sub"] if subject else "gw"
        claims: dict[str, Any] = {"sub": sub, "n": self.issued}
        if form.get("grant_type") == TOKEN_EXCHANGE:
            claims["act"] = {"sub": "gw", "act": {"sub": "agent-7"}}
        body: dict[str, Any] = {
            "access_token": jwt.encode(claims, "k" * 32, algorithm="HS256"),
            "token_type": "Bearer",
            "issued_token_type": ID_JAG_TOKEN_TYPE
            if form.get("requested_token_type") == ID_JAG_TOKEN_TYPE
            else ACCESS_TOKEN_TYPE,
        }
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)

    def grants(self, grant_type: str) -> list[dict[str, str]]:
        return [f for f in self.forms if f.get("grant_type") == grant_type]


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def book(**files: Path) -> Secrets:
    """The secrets the tests name: `sts-secret` and `static-key` from the environment, plus `files`."""
    declared = {
        "sts-secret": SecretSource(env="TEST_STS_SECRET"),
        "static-key": SecretSource(env="TEST_STATIC_KEY"),
    }
    return Secrets(declared | {name: SecretSource(file=path) for name, path in files.items()})


def server(credential: dict[str, Any], name: str = "pay", **extra: Any) -> McpServerSpec:
    return McpServerSpec.model_validate({"name": name, "url": UPSTREAM, "credential": credential, **extra})


def exchange_spec(**overrides: Any) -> dict[str, Any]:
    return {
        "mode": "token_exchange",
        "token_url": TOKEN_URL,
        "client": {"client_id": "gw", "secret": "sts-secret"},
        "scopes": ["pay.read"],
        "tool_scopes": {"pay": ["pay.write"]},
    } | overrides


@pytest.fixture(autouse=True)
def sts_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_STS_SECRET", SECRET)
    monkeypatch.setenv("TEST_STATIC_KEY", "static-upstream-key")


@pytest.fixture
def sts() -> FakeSts:
    return FakeSts()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def stage_for(sts: FakeSts, clock: Clock) -> AsyncIterator[Callable[..., Credentials]]:
    made: list[Credentials] = []

    def build(
        *specs: McpServerSpec, builtin: TokenService | None = None, secrets: Secrets | None = None
    ) -> Credentials:
        by_name = {s.name: s for s in specs}
        http = httpx.AsyncClient(transport=httpx.MockTransport(sts))
        stage = Credentials(by_name.get, http=http, builtin=builtin, clock=clock, secrets=secrets or book())
        made.append(stage)
        return stage

    yield build
    for stage in made:
        await stage.aclose()


class Terminal:
    """The upstream: records the Authorization it was given; answers 401 the first `refuse` times."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.seen: list[str | None] = []

    async def __call__(self, call: Call) -> Reply:
        self.seen.append(call.upstream_authorization)
        if self.refuse > 0:
            self.refuse -= 1
            raise UpstreamUnauthorized("upstream 'pay' refused the gateway's credential")
        return Reply(payload="ok")


# --- pure pieces ---


def test_a_token_is_replaced_thirty_seconds_early_or_at_half_life_when_short() -> None:
    assert refresh_at(100.0, 3600) == 100.0 + 3570
    assert refresh_at(100.0, 40) == 100.0 + 20
    assert refresh_at(100.0, 1) == 100.5


def test_scopes_add_the_tools_own_scopes_only_for_that_tool_of_that_upstream() -> None:
    per_tool = {"pay": ["pay.write"], "refund": ["pay.admin"]}
    assert scopes_for(["pay.read"], per_tool, "mcp:pay/pay", "pay") == ("pay.read", "pay.write")
    assert scopes_for(["pay.read"], per_tool, "mcp:pay/whoami", "pay") == ("pay.read",)
    assert scopes_for(["pay.read"], per_tool, "mcp:pay", "pay") == ("pay.read",)
    assert scopes_for([], per_tool, "mcp:pay/prompt/pay", "pay") == ()
    assert scopes_for([], per_tool, "mcp:payx/pay", "pay") == ()


def test_cache_keys_hold_a_hash_of_the_callers_token_never_the_token() -> None:
    token = user_token()
    assert token not in caller_key(token) and len(caller_key(token)) == 64
    assert caller_key(token) != caller_key(user_token("bob"))


def test_the_delegation_chain_is_read_from_the_act_claim_current_first() -> None:
    token = jwt.encode(
        {"sub": "a", "act": {"sub": "gw", "act": {"sub": "agent"}}}, "k" * 32, algorithm="HS256"
    )
    assert chain_of(token) == ("client:gw", "client:agent")
    assert chain_of("opaque-token") == ()
    assert chain_of(jwt.encode({"sub": "a", "act": "bad"}, "k" * 32, algorithm="HS256")) == ()


def test_credential_specs_name_secrets_and_refuse_what_cannot_work() -> None:
    spec = server({"mode": "static", "secret": "static-key"})
    assert "static-upstream-key" not in spec.model_dump_json()
    with pytest.raises(ValueError, match="never an environment variable or a file"):
        server({"mode": "static", "file": "/x"})
    with pytest.raises(ValueError, match="never an environment variable or a file"):
        server({"mode": "static", "env": "X"})
    with pytest.raises(ValueError, match="secret"):
        server({"mode": "static"})
    with pytest.raises(ValueError, match="invalid name"):
        server({"mode": "static", "secret": "NOT_A_NAME"})
    with pytest.raises(ValueError, match="Extra inputs"):
        server({"mode": "static", "value": "inline-secret", "secret": "x"})  # no inline secrets
    with pytest.raises(ValueError, match="streamable-http"):
        server(exchange_spec(), transport="sse")
    with pytest.raises(ValueError, match="stdio"):
        McpServerSpec.model_validate(
            {
                "name": "s",
                "transport": "stdio",
                "command": "x",
                "credential": {"mode": "static", "secret": "x"},
            }
        )
    with pytest.raises(ValueError, match="passthrough"):
        server({"mode": "passthrough"})
    with pytest.raises(ValueError, match="scope"):
        server(exchange_spec(scopes=["two words"]))


# --- modes ---


async def test_mode_none_sends_no_authorization_and_clears_anything_set_before(
    stage_for: Callable[..., Credentials],
) -> None:
    stage = stage_for(server({"mode": "none"}))
    call = mcp_call()
    call.upstream_authorization = "Bearer the-callers-token"  # an earlier stage gone wrong
    terminal = Terminal()
    await stage(call, terminal)
    assert terminal.seen == [None] and call.credential_mode == "none"


async def test_other_protocols_never_carry_anything_of_the_callers(
    stage_for: Callable[..., Credentials],
) -> None:
    stage = stage_for(server(exchange_spec()))
    call = Call(protocol="a2a", action="send", resource="a2a:pay/x", upstream="pay", method="SendMessage")
    call.upstream_authorization = "Bearer leaked"
    terminal = Terminal()
    await stage(call, terminal)
    assert terminal.seen == [None] and call.credential_mode is None


async def test_static_mode_sends_the_secret_from_the_environment_or_a_file(
    stage_for: Callable[..., Credentials], tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    stage = stage_for(
        server({"mode": "static", "secret": "static-key"}),
        server({"mode": "static", "secret": "filed-key"}, name="filed"),
        secrets=book(**{"filed-key": key_file}),
    )
    terminal = Terminal()
    await stage(mcp_call(), terminal)
    await stage(mcp_call("filed", "mcp:filed/x"), terminal)
    assert terminal.seen == ["Bearer static-upstream-key", "Bearer file-key"]


async def test_a_missing_secret_stops_start_up_naming_it_and_logging_where_it_was_looked_for(
    stage_for: Callable[..., Credentials],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("TEST_STATIC_KEY")
    (tmp_path / "empty").write_text("\n")
    secrets = book(nope=tmp_path / "nope", empty=tmp_path / "empty")
    with pytest.raises(CredentialConfigError, match="secret 'static-key' cannot be read") as unset:
        stage_for(secrets=secrets).prepare([server({"mode": "static", "secret": "static-key"})])
    assert "TEST_STATIC_KEY" not in str(unset.value) and "TEST_STATIC_KEY is not set" in caplog.text
    with pytest.raises(CredentialConfigError, match="secret 'nope' cannot be read"):
        stage_for(secrets=secrets).prepare([server({"mode": "static", "secret": "nope"})])
    assert f"cannot read file {tmp_path / 'nope'}" in caplog.text
    with pytest.raises(CredentialConfigError, match="secret 'empty' cannot be read"):
        stage_for(secrets=secrets).prepare([server({"mode": "static", "secret": "empty"})])
    assert "is empty" in caplog.text
    with pytest.raises(CredentialConfigError, match="unknown secret 'undeclared'"):
        stage_for().prepare([server({"mode": "static", "secret": "undeclared"})])
    with pytest.raises(CredentialConfigError, match="token_url is required"):
        stage_for().prepare([server(exchange_spec(token_url=None))])


async def test_a_server_added_later_with_a_missing_secret_fails_its_calls_clearly(
    stage_for: Callable[..., Credentials], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TEST_STS_SECRET")
    stage = stage_for(server(exchange_spec()))
    terminal = Terminal()
    with pytest.raises(CredentialError, match="not configured correctly"):
        await stage(mcp_call(), terminal)
    assert terminal.seen == [] and "TEST_STS_SECRET" in caplog.text


async def test_client_credentials_are_fetched_once_for_every_caller(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    spec = server(
        {
            "mode": "client_credentials",
            "token_url": TOKEN_URL,
            "client": {"client_id": "gw", "secret": "sts-secret", "method": "client_secret_post"},
            "scopes": ["b", "a"],
            "audience": "payments-api",
        }
    )
    stage = stage_for(spec)
    terminal = Terminal()
    await stage(mcp_call(who=principal(user_token("alice"))), terminal)
    await stage(mcp_call(who=principal(user_token("bob"), "user:bob")), terminal)
    await stage(mcp_call(who=ANONYMOUS), terminal)
    assert len(sts.forms) == 1 and len(set(terminal.seen)) == 1
    form = sts.forms[0]
    assert form == {
        "grant_type": "client_credentials",
        "scope": "a b",
        "resource": UPSTREAM,
        "audience": "payments-api",
        "client_id": "gw",
        "client_secret": SECRET,
    }


async def test_token_exchange_sends_the_callers_token_as_subject_and_the_gateways_as_actor(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec()))
    caller = user_token()
    call = mcp_call(who=principal(caller))
    terminal = Terminal()
    await stage(call, terminal)
    actor, exchange = sts.forms
    assert actor["grant_type"] == "client_credentials"
    assert exchange["grant_type"] == TOKEN_EXCHANGE
    assert exchange["subject_token"] == caller and exchange["subject_token_type"] == ACCESS_TOKEN_TYPE
    assert exchange["actor_token_type"] == ACCESS_TOKEN_TYPE and exchange["actor_token"] != caller
    assert exchange["resource"] == UPSTREAM and exchange["scope"] == "pay.read"
    assert exchange["requested_token_type"] == ACCESS_TOKEN_TYPE and "audience" not in exchange
    # client_secret_basic, both parts form-urlencoded (RFC 6749 2.3.1)
    assert sts.headers[1]["authorization"] == "Basic " + base64.b64encode(f"gw:{SECRET}".encode()).decode()
    assert terminal.seen[0] is not None and caller not in terminal.seen[0]
    assert call.credential_mode == "token_exchange"
    assert call.upstream_actors == ("client:gw", "client:agent-7")


async def test_exchanged_tokens_are_cached_per_caller_and_per_scope(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec()))
    alice, bob = principal(user_token("alice")), principal(user_token("bob"), "user:bob")
    terminal = Terminal()
    for who in (alice, alice, bob, bob):
        await stage(mcp_call(who=who), terminal)
    await stage(mcp_call(resource="mcp:pay/pay", who=alice), terminal)  # needs pay.write too
    exchanges = sts.grants(TOKEN_EXCHANGE)
    assert [e["scope"] for e in exchanges] == ["pay.read", "pay.read", "pay.read pay.write"]
    assert len(sts.grants("client_credentials")) == 1  # the gateway's actor token is shared
    assert terminal.seen[0] == terminal.seen[1] != terminal.seen[2] == terminal.seen[3]


async def test_fifty_concurrent_first_calls_make_one_exchange(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec()))
    sts.gate = asyncio.Event()
    terminal = Terminal()
    who = principal()
    calls = [asyncio.create_task(stage(mcp_call(who=who), terminal)) for _ in range(50)]
    await asyncio.wait_for(sts.arrived.wait(), 5)  # the actor token request is in flight
    for _ in range(20):  # let every call reach the cache and wait there
        await asyncio.sleep(0)
    sts.gate.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*calls)
    assert len(sts.grants(TOKEN_EXCHANGE)) == 1 and len(sts.grants("client_credentials")) == 1
    assert len(terminal.seen) == 50 and len(set(terminal.seen)) == 1


async def test_a_failed_exchange_fails_every_waiter_and_is_not_cached(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec(actor_token=False)))
    sts.answers = [httpx.Response(400, json={"error": "invalid_grant"})]
    sts.gate = asyncio.Event()
    who = principal()
    calls = [asyncio.create_task(stage(mcp_call(who=who), Terminal())) for _ in range(5)]
    await asyncio.wait_for(sts.arrived.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)
    sts.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, CredentialError) for r in results) and len(sts.forms) == 1
    await stage(mcp_call(who=who), Terminal())  # the next call asks again
    assert len(sts.forms) == 2


async def test_an_exchanged_token_is_replaced_before_it_expires(
    stage_for: Callable[..., Credentials], sts: FakeSts, clock: Clock
) -> None:
    sts.expires_in = 300
    stage = stage_for(server(exchange_spec(actor_token=False)))
    terminal = Terminal()
    await stage(mcp_call(), terminal)
    clock.now += 269  # still 31 s to live
    await stage(mcp_call(), terminal)
    clock.now += 2  # 29 s to live: too close to the end
    await stage(mcp_call(), terminal)
    assert len(sts.forms) == 2 and terminal.seen[0] == terminal.seen[1] != terminal.seen[2]


async def test_a_token_without_a_stated_lifetime_lives_as_long_as_its_exp_says(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    sts.expires_in = None
    expired = jwt.encode({"sub": "alice", "exp": 1}, "k" * 32, algorithm="HS256")
    sts.answers = [httpx.Response(200, json={"access_token": expired, "token_type": "Bearer"})]
    stage = stage_for(server(exchange_spec(actor_token=False)))
    terminal = Terminal()
    with pytest.raises(CredentialError, match="already expired"):
        await stage(mcp_call(), terminal)
    assert terminal.seen == []


async def test_an_already_expired_exchanged_token_is_never_sent(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    sts.expires_in = 0
    stage = stage_for(server(exchange_spec(actor_token=False)))
    terminal = Terminal()
    with pytest.raises(CredentialError, match="already expired"):
        await stage(mcp_call(), terminal)
    assert terminal.seen == []


async def test_a_401_drops_the_token_and_retries_once_with_a_fresh_one(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec(actor_token=False)))
    terminal = Terminal(refuse=1)
    reply = await stage(mcp_call(), terminal)
    assert reply.payload == "ok" and len(sts.forms) == 2
    assert terminal.seen[0] != terminal.seen[1]
    await stage(mcp_call(), terminal)  # the fresh token is the cached one now
    assert len(sts.forms) == 2 and terminal.seen[2] == terminal.seen[1]


async def test_a_second_401_fails_the_call_after_exactly_one_retry(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    stage = stage_for(server(exchange_spec(actor_token=False)))
    terminal = Terminal(refuse=5)
    with pytest.raises(UpstreamUnauthorized):
        await stage(mcp_call(), terminal)
    assert len(terminal.seen) == 2 and len(sts.forms) == 2


async def test_a_401_for_a_static_secret_is_not_retried(stage_for: Callable[..., Credentials]) -> None:
    stage = stage_for(server({"mode": "static", "secret": "static-key"}))
    terminal = Terminal(refuse=1)
    with pytest.raises(UpstreamUnauthorized):
        await stage(mcp_call(), terminal)
    assert len(terminal.seen) == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(400, json={"error": "invalid_target", "error_description": "no"}), "invalid_target"),
        (httpx.Response(400, json={"error": "invalid_grant"}), "invalid_grant"),
        (httpx.Response(503, text="<html>down</html>"), "HTTP 503"),
        (httpx.ConnectError("refused"), "unreachable"),
        (
            httpx.ReadTimeout("slow"),
            "subject token exchange failed: the token service did not answer within 10s",
        ),
        (httpx.Response(200, json={"token_type": "Bearer"}), "without a token"),
        (httpx.Response(200, text="not json"), "without a token"),
        (
            httpx.Response(
                200, json={"access_token": "x", "token_type": "Bearer", "issued_token_type": "urn:x:saml2"}
            ),
            "issued a urn:x:saml2",
        ),
    ],
)
async def test_a_token_service_that_refuses_fails_the_call_and_never_falls_back(
    stage_for: Callable[..., Credentials], sts: FakeSts, answer: httpx.Response | Exception, message: str
) -> None:
    stage = stage_for(server(exchange_spec(actor_token=False)))
    sts.answers = [answer]
    terminal = Terminal()
    with pytest.raises(CredentialError, match=message) as caught:
        await stage(mcp_call(), terminal)
    assert terminal.seen == []
    if "invalid_" in message:
        assert caught.value.data == {"error": message}


@pytest.mark.parametrize(
    "who",
    [
        ANONYMOUS,
        Principal(subject="client:ci", credential="agk_0123456789ab_secretpart"),
        Principal("user:x"),
    ],
)
async def test_callers_without_an_oauth_token_cannot_be_exchanged(
    stage_for: Callable[..., Credentials], sts: FakeSts, who: Principal
) -> None:
    stage = stage_for(server(exchange_spec()))
    terminal = Terminal()
    with pytest.raises(CredentialError, match="cannot be exchanged"):
        await stage(mcp_call(who=who), terminal)
    assert terminal.seen == [] and sts.forms == []


async def test_secrets_and_tokens_never_reach_the_log(
    stage_for: Callable[..., Credentials], sts: FakeSts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stage = stage_for(server(exchange_spec()))
    caller = user_token()
    await stage(mcp_call(who=principal(caller)), Terminal(refuse=1))
    sts.answers = [httpx.Response(400, json={"error": "invalid_grant", "error_description": "d"})]
    with pytest.raises(CredentialError):
        await stage(mcp_call(resource="mcp:pay/pay", who=principal(caller)), Terminal())
    issued = [f.get("actor_token") for f in sts.forms if f.get("actor_token")]
    for secret in (SECRET, caller, *issued):
        assert secret not in caplog.text
    assert "invalid_grant" in caplog.text
    assert SECRET not in repr(IssuedCredential("Bearer " + SECRET))


async def test_the_gateways_own_credential_serves_shared_sessions_and_refreshes_on_demand(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    spec = server(
        {
            "mode": "client_credentials",
            "token_url": TOKEN_URL,
            "client": {"client_id": "gw", "secret": "sts-secret"},
        }
    )
    stage = stage_for(spec, server({"mode": "none"}, name="open"), server(exchange_spec(), name="exch"))
    shared = stage.session_credential(spec)
    assert shared is not None
    first = await shared.authorization()
    assert await shared.authorization() == first and len(sts.forms) == 1
    assert await shared.authorization(refresh=True) != first and len(sts.forms) == 2
    assert stage.session_credential(server({"mode": "none"}, name="open")) is None
    with pytest.raises(CredentialConfigError, match="per caller"):
        stage.session_credential(server(exchange_spec(), name="exch"))


async def test_a_changed_credential_config_forgets_the_old_tokens(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    specs = {"pay": server(exchange_spec(actor_token=False))}
    stage = stage_for()
    stage._servers = specs.get
    terminal = Terminal()
    await stage(mcp_call(), terminal)
    specs["pay"] = server(exchange_spec(actor_token=False, scopes=["other"]))
    await stage(mcp_call(), terminal)
    assert [f["scope"] for f in sts.forms] == ["pay.read", "other"]


async def test_the_cache_is_bounded_and_drops_only_the_token_that_was_refused(clock: Clock) -> None:
    cache = MemoryTokenCache(clock=clock, max_entries=3)
    made = 0

    async def fetch() -> IssuedCredential:
        nonlocal made
        made += 1
        return IssuedCredential(f"Bearer t{made}", clock.now + 100)

    keys = [CacheKey(str(i), "pay", ()) for i in range(5)]
    for key in keys:
        await cache.get(key, fetch)
    assert len(cache) == 3
    current = await cache.get(keys[-1], fetch)
    await cache.drop(keys[-1], IssuedCredential("Bearer other"))  # already replaced: kept
    assert await cache.get(keys[-1], fetch) is current
    await cache.drop(keys[-1], current)
    assert (await cache.get(keys[-1], fetch)).authorization == f"Bearer t{made}" != current.authorization


# --- real token services, in-process ---


def sts_client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport)


async def test_token_exchange_and_private_key_jwt_against_the_authlib_sts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (tmp_path / "gw.pem").write_text(pem)
    public = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}
    app = sts_app(
        9999,
        {
            "clients": [
                {
                    "client_id": "gw",
                    "jwks": {"keys": [public]},
                    "audiences": [UPSTREAM],
                    "grant_types": ["client_credentials", TOKEN_EXCHANGE],
                }
            ]
        },
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://127.0.0.1:9999"
    ) as http:
        caller = (
            await http.post(
                "/_fixture/mint", json={"sub": "alice", "aud": "http://gw/mcp", "scope": "pay.read x"}
            )
        ).json()["access_token"]
        spec = server(
            exchange_spec(
                token_url="http://127.0.0.1:9999/token",
                client={"client_id": "gw", "method": "private_key_jwt", "secret": "gw-pem", "key_id": "k1"},
            )
        )
        secrets = book(**{"gw-pem": tmp_path / "gw.pem"})
        stage = Credentials({"pay": spec}.get, http=http, secrets=secrets)
        terminal = Terminal()
        call = mcp_call(who=principal(caller))
        await stage(call, terminal)
        assert terminal.seen[0] is not None
        claims = jwt.decode(terminal.seen[0].removeprefix("Bearer "), options={"verify_signature": False})
        assert claims["sub"] == "alice" and claims["aud"] == UPSTREAM and claims["scope"] == "pay.read"
        assert claims["act"] == {"sub": "gw"} and call.upstream_actors == ("client:gw",)
        records = (await http.get("/_fixture/requests")).json()
        assert [r["auth"] for r in records] == ["private_key_jwt", "private_key_jwt"]
        # The STS refuses a target the client may not have, and the call says so.
        stage_elsewhere = Credentials(
            {
                "pay": spec.model_copy(
                    update={"credential": spec.credential.model_copy(update={"resource": "http://x/mcp"})}
                )
            }.get,
            http=http,
            secrets=secrets,
        )
        with pytest.raises(CredentialError, match="invalid_target"):
            await stage_elsewhere(mcp_call(who=principal(caller)), Terminal())


async def test_a_bad_private_key_stops_start_up(
    stage_for: Callable[..., Credentials], tmp_path: Path
) -> None:
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    spec = server(exchange_spec(client={"client_id": "gw", "method": "private_key_jwt", "secret": "bad-pem"}))
    with pytest.raises(CredentialConfigError, match="private key is unusable"):
        stage_for(secrets=book(**{"bad-pem": tmp_path / "bad.pem"})).prepare([spec])


async def test_id_jag_exchanges_at_the_idp_then_presents_the_grant_to_the_upstreams_server(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    spec = server(
        {
            "mode": "id_jag",
            "idp_token_url": "http://idp.test/token",
            "idp_client": {"client_id": "gw-at-idp", "secret": "sts-secret"},
            "authorization_server": "http://as.test",
            "token_url": TOKEN_URL,
            "client": {"client_id": "gw", "secret": "sts-secret", "method": "client_secret_post"},
            "scopes": ["pay.read"],
        }
    )
    stage = stage_for(spec)
    caller = user_token()
    call = mcp_call(who=principal(caller))
    terminal = Terminal()
    await stage(call, terminal)
    jag_request, bearer_request = sts.forms
    assert (
        jag_request["grant_type"] == TOKEN_EXCHANGE
        and jag_request["requested_token_type"] == ID_JAG_TOKEN_TYPE
    )
    assert jag_request["audience"] == "http://as.test" and jag_request["resource"] == UPSTREAM
    assert jag_request["subject_token"] == caller and "client_id" not in jag_request  # basic auth at the IdP
    assert bearer_request["grant_type"] == JWT_BEARER and bearer_request["client_id"] == "gw"
    assert bearer_request["assertion"] != caller and bearer_request["scope"] == "pay.read"
    assert call.credential_mode == "id_jag" and terminal.seen[0] is not None


async def test_an_idp_that_does_not_issue_an_id_jag_fails_the_call(
    stage_for: Callable[..., Credentials], sts: FakeSts
) -> None:
    spec = server(
        {
            "mode": "id_jag",
            "idp_token_url": "http://idp.test/token",
            "idp_client": {"client_id": "gw", "secret": "sts-secret"},
            "authorization_server": "http://as.test",
            "token_url": TOKEN_URL,
            "client": {"client_id": "gw", "secret": "sts-secret"},
        }
    )
    sts.answers = [httpx.Response(200, json={"access_token": "x", "token_type": "Bearer"})]
    with pytest.raises(CredentialError, match="did not issue an ID-JAG"):
        await stage_for(spec)(mcp_call(), Terminal())
    assert len(sts.forms) == 1
