"""The built-in authorization server, in-process: client credentials, code + PKCE, token exchange,
Client ID Metadata Documents, and the requests it must refuse."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from fastapi import FastAPI

from agentgw.fetch_guard import FetchGuard
from agentgw.oauth.config import BuiltinAuthServer, BuiltinClient, BuiltinUser
from agentgw.oauth.jwks import LocalKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.pending import PendingLogins
from agentgw.oauth.server import (
    TOKEN_EXCHANGE,
    AuthorizationServer,
    check_password,
    hash_password,
    hash_secret,
    mint_token,
    oauth_router,
)
from agentgw.oauth.verify import JwtVerifier, TrustedIssuer
from agentgw.storage import make_engine
from tests.support.servers import Answer, LocalServer, Received, Scripted, tls_ca

BASE = "http://127.0.0.1:8080"
REDIRECT = "http://127.0.0.1:9999/cb"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


# Client ID Metadata Documents are served over https on loopback, which the server's fetch guard
# allow-lists for these tests and whose certificate authority it trusts.
CA = tls_ca()
TRUST = ssl.create_default_context()
CA.configure_trust(TRUST)


@pytest.fixture
async def documents() -> AsyncIterator[str]:
    """The base URL of a client's documents: its own at /mcp-client.json, another's at /liar.json."""
    server = LocalServer(tls=CA.issue_cert("127.0.0.1"))
    own = f"{server.url}/mcp-client.json"

    def answer(request: Received) -> Answer:
        if request.path == "/mcp-client.json":
            document = {"client_id": own, "redirect_uris": [REDIRECT], "client_name": "x"}
        elif request.path == "/liar.json":
            document = {"client_id": own, "redirect_uris": [REDIRECT]}
        else:
            return Answer(404)
        return Answer(200, [json.dumps(document).encode()], {"content-type": "application/json"})

    async with server.serve(Scripted(answer)):
        yield server.url


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "keys.json")


@pytest.fixture
async def client(keys: SigningKeys, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = BuiltinAuthServer(
        clients=[
            BuiltinClient(
                client_id="ci",
                client_secret_sha256=hash_secret("s3cret"),
                grant_types=["client_credentials", TOKEN_EXCHANGE],
                roles=["operator"],
            ),
            BuiltinClient(client_id="app", redirect_uris=[REDIRECT]),
            BuiltinClient(client_id="limited", redirect_uris=[REDIRECT], scopes=["read"]),
        ],
        users=[BuiltinUser(name="alice", password_hash=hash_password("pw"), roles=["dev"])],
    )
    verifier = JwtVerifier([TrustedIssuer(BASE, LocalKeySet(keys))])
    server = AuthorizationServer(
        BASE,
        config,
        keys,
        verifier=verifier,
        known_scopes=lambda: {"read", "write"},
        pending=PendingLogins(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")),
        fetch=FetchGuard(["127.0.0.1"], ssl_context=TRUST),
    )
    app = FastAPI()
    app.include_router(oauth_router(server))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        yield http


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str | None, client_id: str = "app", **extra: str) -> dict[str, str]:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "st"}
    if challenge is not None:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    return params | extra


async def code_for(http: httpx.AsyncClient, challenge: str, **extra: str) -> str:
    params = authorize_params(challenge, **extra)
    form = await http.get("/oauth/authorize", params=params)
    assert form.status_code == 200 and 'type="password"' in form.text
    answer = await http.post("/oauth/authorize", data=params | {"username": "alice", "password": "pw"})
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["st"]
    return query["code"][0]


def test_passwords_are_stored_as_salted_scrypt_hashes() -> None:
    stored = hash_password("pw")
    assert stored.startswith("scrypt$") and "pw" not in stored and stored != hash_password("pw")
    assert check_password("pw", stored) and not check_password("pW", stored)
    assert not check_password("pw", "plain") and not check_password("pw", "scrypt$zz$zz")


async def test_the_metadata_document_describes_the_server(client: httpx.AsyncClient) -> None:
    metadata = (await client.get("/.well-known/oauth-authorization-server")).json()
    assert metadata["issuer"] == BASE
    assert metadata["token_endpoint"] == f"{BASE}/oauth/token"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["client_id_metadata_document_supported"] is True
    assert metadata["scopes_supported"] == ["read", "write"]
    jwks = (await client.get(metadata["jwks_uri"].removeprefix(BASE))).json()
    assert {k["kty"] for k in jwks["keys"]} == {"RSA"} and all("d" not in k for k in jwks["keys"])


async def test_client_credentials_give_a_client_token_for_the_requested_resource(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "read", "resource": f"{BASE}/admin"},
        auth=("ci", "s3cret"),
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    claims = claims_of(answer.json()["access_token"])
    assert (claims["sub"], claims["client_id"], claims["aud"]) == ("ci", "ci", f"{BASE}/admin")
    assert claims["roles"] == ["operator"] and claims["scope"] == "read" and claims["iss"] == BASE
    default = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=("ci", "s3cret")
    )
    assert claims_of(default.json()["access_token"])["aud"] == f"{BASE}/mcp"


@pytest.mark.parametrize(
    ("data", "auth", "error"),
    [
        ({"grant_type": "client_credentials"}, ("ci", "wrong"), "invalid_client"),
        ({"grant_type": "client_credentials", "client_id": "app"}, None, "invalid_client"),
        ({"grant_type": "client_credentials", "scope": "root"}, ("ci", "s3cret"), "invalid_scope"),
        (
            {"grant_type": "client_credentials", "resource": "https://evil.example/"},
            ("ci", "s3cret"),
            "invalid_target",
        ),
        (
            {"grant_type": "client_credentials", "resource": f"{BASE}2/mcp"},
            ("ci", "s3cret"),
            "invalid_target",
        ),
        (
            {"grant_type": "password", "username": "alice", "password": "pw"},
            ("ci", "s3cret"),
            "unsupported_grant_type",
        ),
        ({"grant_type": "implicit"}, None, "unsupported_grant_type"),
    ],
)
async def test_bad_token_requests_are_refused(
    client: httpx.AsyncClient, data: dict[str, str], auth: tuple[str, str] | None, error: str
) -> None:
    answer = await client.post("/oauth/token", data=data, auth=auth or httpx.USE_CLIENT_DEFAULT)
    assert answer.status_code in (400, 401), answer.text
    assert answer.json()["error"] == error


async def test_the_code_flow_with_pkce_gives_a_user_token_once(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    resource = f"{BASE}/mcp/github"
    code = await code_for(client, challenge, scope="read write", resource=resource)
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "app",
        "code_verifier": verifier,
        "resource": resource,
    }
    answer = await client.post("/oauth/token", data=exchange)
    assert answer.status_code == 200, answer.text
    claims = claims_of(answer.json()["access_token"])
    assert (claims["sub"], claims["client_id"], claims["aud"]) == ("alice", "app", resource)
    assert claims["roles"] == ["dev"] and claims["scope"] == "read write"
    replay = await client.post("/oauth/token", data=exchange)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"


async def test_a_client_gets_only_the_scopes_it_is_registered_for(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    code = await code_for(client, challenge, client_id="limited", scope="read write")
    answer = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "limited",
            "code_verifier": verifier,
        },
    )
    assert claims_of(answer.json()["access_token"])["scope"] == "read"


async def test_the_code_is_refused_with_a_wrong_verifier_another_client_or_another_resource(
    client: httpx.AsyncClient,
) -> None:
    for change in (
        {"code_verifier": secrets.token_urlsafe(48)},
        {"client_id": "limited"},
        {"resource": f"{BASE}/mcp/other"},
        {"redirect_uri": "http://127.0.0.1:9999/other"},
    ):
        verifier, challenge = pkce()
        code = await code_for(client, challenge, resource=f"{BASE}/mcp/github")
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "app",
            "code_verifier": verifier,
        } | change
        answer = await client.post("/oauth/token", data=data)
        assert answer.status_code in (400, 401), change
        assert answer.json()["error"] in (
            "invalid_grant",
            "invalid_request",
            "invalid_client",
            "invalid_target",
        ), change


@pytest.mark.parametrize(
    ("params", "redirected"),
    [
        (authorize_params(None), True),  # no PKCE
        (authorize_params("x" * 43) | {"code_challenge_method": "plain"}, True),
        (authorize_params("x" * 43, redirect_uri="http://evil.example/cb"), False),
        (authorize_params("x" * 43, client_id="nobody"), False),
        (authorize_params("x" * 43, resource="https://evil.example/mcp"), True),
        (authorize_params("x" * 43, scope="root"), True),
    ],
)
async def test_bad_authorization_requests_never_show_the_login_form(
    client: httpx.AsyncClient, params: dict[str, str], redirected: bool
) -> None:
    answer = await client.get("/oauth/authorize", params=params)
    assert "password" not in answer.text
    if redirected:
        assert answer.status_code == 302
        location = answer.headers["location"]
        assert location.startswith(REDIRECT) and "error=" in location
    else:
        # Never redirect to an unverified URI: an open redirector would leak the error to anyone.
        assert answer.status_code == 400


async def test_a_wrong_password_shows_the_form_again_without_a_code(client: httpx.AsyncClient) -> None:
    _, challenge = pkce()
    params = authorize_params(challenge)
    answer = await client.post("/oauth/authorize", data=params | {"username": "alice", "password": "nope"})
    assert answer.status_code == 401 and "location" not in answer.headers
    answer = await client.post("/oauth/authorize", data=params | {"username": "mallory", "password": "pw"})
    assert answer.status_code == 401


async def test_a_client_id_metadata_document_registers_a_public_client(
    client: httpx.AsyncClient, documents: str
) -> None:
    client_id = f"{documents}/mcp-client.json"
    verifier, challenge = pkce()
    code = await code_for(client, challenge, client_id=client_id)
    answer = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["access_token"])["client_id"] == client_id


@pytest.mark.parametrize(
    ("client_id", "why"),
    [
        ("{base}/liar.json", "client metadata document refused: the document's client_id is not its own URL"),
        ("{base}/missing.json", "client metadata document refused: HTTP 404"),
        ("http://client.example/x", "client metadata document refused: a client id URL must be https"),
        ("not-a-url", "The client does not exist on this server."),  # neither registered nor a document
    ],
)
async def test_a_metadata_document_that_is_missing_or_not_its_own_is_refused_saying_why(
    client: httpx.AsyncClient, documents: str, client_id: str, why: str
) -> None:
    client_id = client_id.format(base=documents)
    _, challenge = pkce()
    answer = await client.get("/oauth/authorize", params=authorize_params(challenge, client_id=client_id))
    body = answer.json()
    assert answer.status_code == 400 and (body["error"], body["error_description"]) == ("invalid_client", why)


async def test_token_exchange_carries_the_subject_and_names_the_actor(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    subject, _ = mint_token(
        keys,
        BASE,
        subject="alice",
        audience=f"{BASE}/mcp",
        scopes=["read", "write"],
        roles=["dev"],
        act={"sub": "earlier"},
    )
    answer = await client.post(
        "/oauth/token",
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS,
            "scope": "read",
            "resource": f"{BASE}/mcp/github",
        },
        auth=("ci", "s3cret"),
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["issued_token_type"] == ACCESS and body["token_type"] == "Bearer"
    claims = claims_of(body["access_token"])
    assert claims["sub"] == "alice" and claims["aud"] == f"{BASE}/mcp/github" and claims["scope"] == "read"
    assert claims["act"] == {"sub": "ci", "act": {"sub": "earlier"}} and claims["roles"] == ["dev"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"scope": "read write"}, "invalid_scope"),  # wider than the subject token
        ({"subject_token": "garbage"}, "invalid_grant"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"}, "invalid_request"),
        ({"subject_token": None}, "invalid_request"),
    ],
)
async def test_token_exchange_refuses_bad_requests(
    client: httpx.AsyncClient, keys: SigningKeys, change: dict[str, str | None], error: str
) -> None:
    subject, _ = mint_token(keys, BASE, subject="alice", audience=f"{BASE}/mcp", scopes=["read"])
    data = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS} | change
    answer = await client.post(
        "/oauth/token", data={k: v for k, v in data.items() if v is not None}, auth=("ci", "s3cret")
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == error


async def test_token_exchange_honours_may_act_and_needs_a_confidential_client(
    client: httpx.AsyncClient, keys: SigningKeys
) -> None:
    subject, _ = mint_token(keys, BASE, subject="alice", audience=f"{BASE}/mcp")
    token = keys.sign({**claims_of(subject), "may_act": {"sub": "someone-else"}})
    data = {"grant_type": TOKEN_EXCHANGE, "subject_token": token, "subject_token_type": ACCESS}
    answer = await client.post("/oauth/token", data=data, auth=("ci", "s3cret"))
    assert answer.json()["error"] == "invalid_grant"
    foreign, _ = mint_token(keys, BASE, subject="alice", audience="https://elsewhere.example/api")
    answer = await client.post("/oauth/token", data=data | {"subject_token": foreign}, auth=("ci", "s3cret"))
    assert answer.json()["error"] == "invalid_grant"
    answer = await client.post("/oauth/token", data=data | {"subject_token": subject, "client_id": "app"})
    assert answer.status_code in (400, 401)
