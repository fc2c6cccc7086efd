"""RFC 8693 both ways: the checks of the built-in STS (pure functions, then the token endpoint in-process)
and the gateway's token-endpoint client (client authentication, answers, refusals)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from agentgw.errors import CredentialError
from agentgw.oauth.config import BuiltinAuthServer, BuiltinClient, ExchangePermission
from agentgw.oauth.exchange import (
    ACCESS_TOKEN_TYPE,
    CLIENT_ASSERTION_TYPE,
    MAX_CHAIN,
    TOKEN_EXCHANGE,
    TOKEN_TYPES,
    TokenAnswer,
    TokenEndpoint,
    actor_allowed,
    check_exchanged,
    delegation,
    load_private_key,
    narrowed_scopes,
)
from agentgw.oauth.jwks import LocalKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.pending import PendingLogins
from agentgw.oauth.server import AuthorizationServer, hash_secret, mint_token, oauth_router
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from agentgw.registry.models import ClientAuth
from agentgw.registry.secrets import Secret
from agentgw.storage import make_engine

BASE = "http://127.0.0.1:8080"
UPSTREAM = "https://payments.example/mcp"


# --- pure checks ---


def test_an_exchange_narrows_scopes_and_never_widens_them() -> None:
    assert narrowed_scopes(None, {"a", "b"}) == ["a", "b"]
    assert narrowed_scopes("b", {"a", "b"}) == ["b"]
    with pytest.raises(InvalidScopeError, match="c"):
        narrowed_scopes("a c", {"a", "b"})
    assert narrowed_scopes("a c", {"a"}, may_add={"c"}) == ["a", "c"]


def test_may_act_names_who_may_act_and_a_malformed_one_allows_nobody() -> None:
    gateway = {"sub": "agentgw", "iss": "https://idp"}
    assert actor_allowed(None, gateway)
    assert actor_allowed({"sub": "agentgw"}, gateway)
    assert actor_allowed({"sub": "agentgw", "iss": "https://idp"}, gateway)
    assert not actor_allowed({"sub": "agentgw", "iss": "https://other"}, gateway)
    assert not actor_allowed({"sub": "someone-else"}, gateway)
    assert not actor_allowed({}, gateway)
    assert not actor_allowed("agentgw", gateway)


def test_the_current_actor_wraps_the_earlier_chain() -> None:
    assert delegation({"sub": "gw"}, None) == {"sub": "gw"}
    assert delegation({"sub": "gw2"}, {"sub": "gw1", "act": {"sub": "agent"}}) == {
        "sub": "gw2",
        "act": {"sub": "gw1", "act": {"sub": "agent"}},
    }
    with pytest.raises(InvalidRequestError, match="malformed"):
        delegation({"sub": "gw"}, {"act": {"sub": "x"}})
    chain: dict[str, Any] = {"sub": "a0"}
    for i in range(1, MAX_CHAIN):
        chain = {"sub": f"a{i}", "act": chain}
    with pytest.raises(InvalidRequestError, match="longer than"):
        delegation({"sub": "gw"}, chain)


# --- the built-in STS ---


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "keys.json")


@pytest.fixture
async def client(keys: SigningKeys, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    exchange_grants = ["client_credentials", TOKEN_EXCHANGE]
    config = BuiltinAuthServer(
        clients=[
            BuiltinClient(
                client_id="agentgw",
                client_secret_sha256=hash_secret("gw-secret"),
                grant_types=exchange_grants,
                exchange=ExchangePermission(audiences=[UPSTREAM], scopes=["payments.extra"]),
            ),
            BuiltinClient(
                client_id="other", client_secret_sha256=hash_secret("o"), grant_types=exchange_grants
            ),
        ]
    )
    verifier = JwtVerifier([TrustedIssuer(BASE, LocalKeySet(keys))])
    server = AuthorizationServer(
        BASE,
        config,
        keys,
        verifier=verifier,
        known_scopes=lambda: {"payments", "payments.extra", "x"},
        pending=PendingLogins(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")),
    )
    app = FastAPI()
    app.include_router(oauth_router(server))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        yield http


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def user(keys: SigningKeys, **extra: Any) -> str:
    options: dict[str, Any] = {
        "subject": "alice",
        "audience": f"{BASE}/mcp/payments",
        "scopes": ["payments", "x"],
    }
    return mint_token(keys, BASE, **(options | extra))[0]


def exchange_form(subject: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "resource": UPSTREAM,
    } | extra


async def actor_token(http: httpx.AsyncClient, auth: tuple[str, str] = ("agentgw", "gw-secret")) -> str:
    answer = await http.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=auth)
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


async def test_a_client_gets_tokens_for_its_allowed_upstream_audience_only(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    answer = await client.post("/oauth/token", data=exchange_form(user(keys)), auth=("agentgw", "gw-secret"))
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["access_token"])["aud"] == UPSTREAM
    other = await client.post("/oauth/token", data=exchange_form(user(keys)), auth=("other", "o"))
    assert other.status_code == 400 and other.json()["error"] == "invalid_target"
    elsewhere = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys), resource="https://elsewhere.example/mcp"),
        auth=("agentgw", "gw-secret"),
    )
    assert elsewhere.json()["error"] == "invalid_target"
    two = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys), audience="https://x.example"),
        auth=("agentgw", "gw-secret"),
    )
    assert two.json()["error"] == "invalid_target"


async def test_client_credentials_reach_an_allowed_upstream_audience_too(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "resource": UPSTREAM},
        auth=("agentgw", "gw-secret"),
    )
    assert answer.status_code == 200 and claims_of(answer.json()["access_token"])["aud"] == UPSTREAM
    refused = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "resource": UPSTREAM}, auth=("other", "o")
    )
    assert refused.json()["error"] == "invalid_target"


async def test_the_actor_token_names_the_actor_and_must_be_the_clients_own(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    own = await actor_token(client)
    form = exchange_form(user(keys), actor_token=own, actor_token_type=ACCESS_TOKEN_TYPE)
    answer = await client.post("/oauth/token", data=form, auth=("agentgw", "gw-secret"))
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["access_token"])["act"] == {"sub": "agentgw"}
    foreign = await actor_token(client, ("other", "o"))
    form = exchange_form(user(keys), actor_token=foreign, actor_token_type=ACCESS_TOKEN_TYPE)
    answer = await client.post("/oauth/token", data=form, auth=("agentgw", "gw-secret"))
    assert answer.json()["error"] == "invalid_grant"


async def test_scopes_only_narrow_unless_the_client_may_add_them(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    narrow = await client.post(
        "/oauth/token", data=exchange_form(user(keys), scope="payments"), auth=("agentgw", "gw-secret")
    )
    assert claims_of(narrow.json()["access_token"])["scope"] == "payments"
    added = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys), scope="payments payments.extra"),
        auth=("agentgw", "gw-secret"),
    )
    assert claims_of(added.json()["access_token"])["scope"] == "payments payments.extra"
    wider = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys, scopes=["x"]), scope="payments"),
        auth=("agentgw", "gw-secret"),
    )
    assert wider.json()["error"] == "invalid_scope"


async def test_may_act_in_the_subject_token_is_honoured(client: httpx.AsyncClient, keys: SigningKeys) -> None:
    allowed = keys.sign({**claims_of(user(keys)), "may_act": {"sub": "agentgw"}})
    answer = await client.post("/oauth/token", data=exchange_form(allowed), auth=("agentgw", "gw-secret"))
    assert answer.status_code == 200
    refused = keys.sign({**claims_of(user(keys)), "may_act": {"sub": "triage-agent"}})
    answer = await client.post("/oauth/token", data=exchange_form(refused), auth=("agentgw", "gw-secret"))
    assert answer.json()["error"] == "invalid_grant"


async def test_a_second_hop_nests_the_first_actor_inside_the_second(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    # The first hop: an agent's token for the gateway, already carrying act (the agent for alice).
    first = user(keys, act={"sub": "triage-agent"})
    answer = await client.post("/oauth/token", data=exchange_form(first), auth=("agentgw", "gw-secret"))
    claims = claims_of(answer.json()["access_token"])
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "agentgw", "act": {"sub": "triage-agent"}}
    assert claims["exp"] <= claims_of(first)["exp"]  # never outlives the subject token


async def test_a_jwt_is_issued_when_asked_for_and_other_types_are_refused(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    answer = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys), requested_token_type=TOKEN_TYPES["jwt"]),
        auth=("agentgw", "gw-secret"),
    )
    assert answer.json()["issued_token_type"] == TOKEN_TYPES["jwt"]
    refused = await client.post(
        "/oauth/token",
        data=exchange_form(user(keys), requested_token_type="urn:ietf:params:oauth:token-type:id-jag"),
        auth=("agentgw", "gw-secret"),
    )
    assert refused.json()["error"] == "invalid_request"


# --- the gateway as a client of a token endpoint ---


def recorder(answer: httpx.Response, seen: list[httpx.Request]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def form_of(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


OK = httpx.Response(200, json={"access_token": "t", "token_type": "Bearer", "expires_in": 60, "scope": "a"})


async def test_client_secret_basic_encodes_both_parts_before_base64() -> None:
    seen: list[httpx.Request] = []
    async with recorder(OK, seen) as http:
        endpoint = TokenEndpoint(
            "https://sts/token",
            ClientAuth(client_id="gw:1", secret="x"),
            Secret("p@ss:w rd"),
            http,
            timeout_s=5,
            label="u",
        )
        answer = await endpoint.request({"grant_type": "client_credentials", "scope": None}, "grant")
    assert answer.access_token == "t" and answer.lifetime_s == 60 and answer.scope == "a"
    header = seen[0].headers["authorization"]
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "gw%3A1:p%40ss%3Aw%20rd"
    assert form_of(seen[0]) == {"grant_type": "client_credentials"}


async def test_private_key_jwt_signs_a_short_single_use_assertion_for_the_endpoint(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    seen: list[httpx.Request] = []
    auth = ClientAuth(client_id="gw", secret="x", method="private_key_jwt", algorithm="ES256", key_id="k9")
    async with recorder(OK, seen) as http:
        endpoint = TokenEndpoint("https://sts/token", auth, Secret(pem), http, timeout_s=5, label="u")
        await endpoint.request({"grant_type": "client_credentials"}, "grant")
        await endpoint.request({"grant_type": "client_credentials"}, "grant")
    forms = [form_of(r) for r in seen]
    assert (
        forms[0]["client_assertion_type"] == CLIENT_ASSERTION_TYPE and "authorization" not in seen[0].headers
    )
    claims = jwt.decode(
        forms[0]["client_assertion"], key.public_key(), algorithms=["ES256"], audience="https://sts/token"
    )
    assert claims["iss"] == claims["sub"] == "gw" and claims["exp"] - claims["iat"] <= 60
    assert jwt.get_unverified_header(forms[0]["client_assertion"])["kid"] == "k9"
    assert forms[0]["client_assertion"] != forms[1]["client_assertion"]  # a fresh jti each time
    with pytest.raises(ValueError, match="cannot sign RS256"):
        load_private_key(pem, "RS256")
    with pytest.raises(ValueError, match="PEM"):
        load_private_key("garbage", "ES256")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            httpx.Response(400, json={"error": "invalid_target"}),
            "grant failed: .* answered HTTP 400 invalid_target",
        ),
        (httpx.Response(400, json={"error": 'bad"code'}), "answered HTTP 400 without an OAuth error code"),
        (httpx.Response(401, text="no"), "answered HTTP 401 without an OAuth error code"),
        (httpx.Response(200, json={"access_token": "t"}), "without a token"),
        (httpx.Response(200, json=["t"]), "without a token"),
        (httpx.Response(200, content=b"{" + b" " * 70_000 + b"}"), "without a token"),
    ],
)
async def test_refusals_and_garbage_become_credential_errors(answer: httpx.Response, message: str) -> None:
    async with recorder(answer, []) as http:
        endpoint = TokenEndpoint(
            "https://sts/token",
            ClientAuth(client_id="gw", secret="x"),
            Secret("s"),
            http,
            timeout_s=5,
            label="u",
        )
        with pytest.raises(CredentialError, match=message):
            await endpoint.request({"grant_type": "client_credentials"}, "grant")


async def test_a_token_without_expires_in_lives_until_its_own_exp() -> None:
    token = jwt.encode({"sub": "a", "exp": 4_000_000_000}, "k" * 32, algorithm="HS256")
    async with recorder(
        httpx.Response(200, json={"access_token": token, "token_type": "Bearer"}), []
    ) as http:
        endpoint = TokenEndpoint(
            "https://sts/token",
            ClientAuth(client_id="gw", secret="x"),
            Secret("s"),
            http,
            timeout_s=5,
            label="u",
        )
        answer = await endpoint.request({"grant_type": "client_credentials"}, "grant")
    assert answer.lifetime_s > 1_000_000
    async with recorder(
        httpx.Response(200, json={"access_token": "opaque", "token_type": "Bearer"}), []
    ) as http:
        endpoint = TokenEndpoint(
            "https://sts/token",
            ClientAuth(client_id="gw", secret="x"),
            Secret("s"),
            http,
            timeout_s=5,
            label="u",
        )
        assert (await endpoint.request({"grant_type": "client_credentials"}, "grant")).lifetime_s == 60


def answered(token: str, scope: str | None = None) -> TokenAnswer:
    return TokenAnswer(token, ACCESS_TOKEN_TYPE, 60.0, scope)


def test_an_exchanged_jwt_must_name_the_caller_and_stay_within_the_scopes_asked_for() -> None:
    def token(**claims: Any) -> str:
        return jwt.encode(claims, "k" * 32, algorithm="HS256")

    check_exchanged(answered(token(sub="alice", scope="a b")), "alice", ["a", "b", "c"])
    check_exchanged(answered(token(sub="alice", scp=["a"]), "a"), "alice", ["a"])
    check_exchanged(answered("opaque-token", "a"), "alice", ["a"])  # nothing to read but `scope`
    refusals = [
        (answered(token(sub="mallory", scope="a")), "does not name the caller"),
        (answered(token(scope="a")), "does not name the caller"),
        (answered(token(sub="alice", scope="a admin")), "not asked for: admin"),
        (answered(token(sub="alice", scp=["a", "admin"])), "not asked for: admin"),
        (answered(token(sub="alice", scope=7)), "not asked for: <malformed>"),
        (answered(token(sub="alice", scope="a"), "a admin"), "not asked for: admin"),
        (answered("opaque-token", "a root"), "not asked for: root"),
    ]
    for answer, why in refusals:
        with pytest.raises(ValueError, match=why):
            check_exchanged(answer, "alice", ["a"])
