"""The gateway as an OAuth resource server, driven by the official MCP SDK through `/mcp/{server}`:
challenges, the SDK's own OAuth flow against the built-in authorization server, forged tokens,
scopes, and per-principal tool lists."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from mcp.shared.exceptions import MCPError

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import hash_password, mint_token
from tests.support.gateway import RunningGateway, run_gateway

ACCEPT = "application/json, text/event-stream"
MODERN = "2026-07-28"
# A complete 2026-07-28 request, as the SDK would send it (no session, no initialize).
LIST = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw-test", "version": "1"},
        }
    },
}
POLICY = [
    "p, role:developer, mcp:modern/*, *, allow",
    "p, role:developer, mcp:scoped/*, *, allow",
    "p, role:reader, mcp:modern/echo, *, allow",
    "p, role:reader, mcp:modern/add, *, allow",
    "g, user:alice, role:developer",
    "g, user:bob, role:reader",
]
REDIRECT_URI = "http://127.0.0.1:1/callback"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            # The same upstream again, behind a scope requirement.
            {"name": "scoped", "url": f"{modern_upstream}/mcp", "scopes": ["mcp.tools", "mcp.admin"]},
        ],
        "policy": {"rules": POLICY},
        "auth": {
            "builtin": {
                "users": [{"name": "alice", "password_hash": hash_password("wonderland")}],
                "clients": [{"client_id": "sdk-test", "redirect_uris": [REDIRECT_URI]}],
            }
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def keys_of(gw: RunningGateway) -> SigningKeys:
    return SigningKeys(gw.signing_keys)


def token(gw: RunningGateway, subject: str, **overrides: Any) -> str:
    options: dict[str, Any] = {"audience": f"{gw.url}/mcp/modern", "client_id": "tests"}
    options.update(overrides)
    value, _ = mint_token(keys_of(gw), gw.url, subject=subject, **options)
    return value


def post(gw: RunningGateway, server: str, bearer: str | None, body: dict[str, Any] = LIST) -> httpx.Response:
    headers = {"accept": ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": body["method"]}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    return httpx.post(gw.mcp(server), json=body, headers=headers)


def challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer ")
    return {k.strip(): v.strip('"') for k, v in (p.split("=", 1) for p in value[7:].split(", "))}


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@asynccontextmanager
async def sdk_client(url: str, bearer: str | None) -> AsyncIterator[Client]:
    headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28") as client,
    ):
        yield client


async def test_without_a_token_the_sdk_client_fails_on_a_401_that_names_the_metadata(
    gateway: RunningGateway,
) -> None:
    with pytest.raises(Exception):  # noqa: B017  (the SDK surfaces the 401 as its own error type)
        async with sdk_client(gateway.mcp("modern"), None) as client:
            await client.list_tools()
    response = post(gateway, "modern", None)
    assert response.status_code == 401
    metadata_url = challenge(response)["resource_metadata"]
    assert metadata_url == f"{gateway.url}/.well-known/oauth-protected-resource/mcp/modern"
    metadata = httpx.get(metadata_url).json()
    assert metadata["resource"] == f"{gateway.url}/mcp/modern"
    assert metadata["authorization_servers"] == [gateway.url]


async def test_the_sdk_oauth_provider_completes_the_code_flow_by_itself_and_calls_tools(
    gateway: RunningGateway,
) -> None:
    class Storage:
        def __init__(self) -> None:
            self.tokens: OAuthToken | None = None
            self.client = OAuthClientInformationFull(
                client_id="sdk-test", redirect_uris=[REDIRECT_URI], token_endpoint_auth_method="none"
            )

        async def get_tokens(self) -> OAuthToken | None:
            return self.tokens

        async def set_tokens(self, tokens: OAuthToken) -> None:
            self.tokens = tokens

        async def get_client_info(self) -> OAuthClientInformationFull | None:
            return self.client

        async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
            self.client = client_info

    authorization_urls: list[str] = []

    async def redirect(url: str) -> None:
        authorization_urls.append(url)

    async def callback() -> AuthorizationCodeResult:
        # The user's browser: the login form, then the password, then the redirect with the code.
        url = authorization_urls[-1]
        async with httpx.AsyncClient() as browser:
            form = await browser.get(url)
            assert form.status_code == 200 and "password" in form.text
            fields = dict(parse_qsl(urlsplit(url).query))
            answer = await browser.post(
                f"{gateway.url}/oauth/authorize",
                data={**fields, "username": "alice", "password": "wonderland"},
            )
        assert answer.status_code == 302, answer.text
        query = parse_qs(urlsplit(answer.headers["location"]).query)
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0])

    storage = Storage()
    provider = OAuthClientProvider(
        gateway.mcp("modern"),
        OAuthClientMetadata(redirect_uris=[REDIRECT_URI], token_endpoint_auth_method="none"),  # type: ignore[list-item]
        storage,
        redirect_handler=redirect,
        callback_handler=callback,
    )
    async with (
        httpx2.AsyncClient(auth=provider) as http,
        Client(streamable_http_client(gateway.mcp("modern"), http_client=http), mode="2026-07-28") as client,
    ):
        tools = await client.list_tools()
        assert "whoami" in {t.name for t in tools.tools}
        result = await client.call_tool("echo", {"text": "through oauth"})
        assert result.content[0].text == "through oauth"  # type: ignore[union-attr]
    assert len(authorization_urls) == 1
    params = parse_qs(urlsplit(authorization_urls[0]).query)
    assert params["code_challenge_method"] == ["S256"]
    assert params["resource"] == [f"{gateway.url}/mcp/modern"]
    assert storage.tokens is not None
    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["aud"] == f"{gateway.url}/mcp/modern"


def forged_tokens(gw: RunningGateway) -> dict[str, str]:
    now = int(time.time())
    keys = keys_of(gw)
    real_kid = keys.jwks()["keys"][0]["kid"]
    claims = {"iss": gw.url, "sub": "alice", "aud": f"{gw.url}/mcp/modern", "iat": now, "exp": now + 600}
    stranger = rsa.generate_private_key(65537, 2048)
    public_pem = jwt.PyJWK(keys.jwks()["keys"][0]).key.public_bytes(  # the gateway's own public key
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = b64({"alg": "HS256", "typ": "JWT", "kid": real_kid})
    hs_body = b64(claims)
    hs_signature = b64(hmac.new(public_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    return {
        "another audience": token(gw, "alice", audience=f"{gw.url}/mcp/scoped"),
        "a look-alike audience": token(gw, "alice", audience=f"{gw.url}/mcp/modern2"),
        "expired": token(gw, "alice", now=now - 7200, ttl_s=600),
        "not yet valid": mint_token(keys, gw.url, subject="alice", audience=claims["aud"], now=now + 3600)[0],
        "an unknown key": jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "no-such-kid"}),
        "a known kid but another key": jwt.encode(
            claims, stranger, algorithm="RS256", headers={"kid": real_kid}
        ),
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "HS256 signed with the RSA public key": f"{hs_header}.{hs_body}.{hs_signature}",
        "an untrusted issuer": jwt.encode(
            {**claims, "iss": "https://idp.evil.example"}, stranger, algorithm="RS256", headers={"kid": "k"}
        ),
        "garbage": "not-a-jwt",
        "a revoked-looking API key": "agk_000000000000_" + "A" * 43,
    }


def test_every_forged_token_is_refused_with_401_and_the_challenge(gateway: RunningGateway) -> None:
    assert post(gateway, "modern", token(gateway, "alice")).status_code == 200
    for case, forged in forged_tokens(gateway).items():
        response = post(gateway, "modern", forged)
        assert response.status_code == 401, case
        params = challenge(response)
        assert params["error"] == "invalid_token", case
        assert params["resource_metadata"].endswith("/.well-known/oauth-protected-resource/mcp/modern"), case


async def test_the_sdk_client_with_a_forged_token_gets_no_tools(gateway: RunningGateway) -> None:
    forged = forged_tokens(gateway)["alg none"]
    with pytest.raises(Exception):  # noqa: B017
        async with sdk_client(gateway.mcp("modern"), forged) as client:
            await client.list_tools()


def test_a_token_without_the_servers_scopes_gets_403_insufficient_scope_naming_them(
    gateway: RunningGateway,
) -> None:
    audience = f"{gateway.url}/mcp/scoped"
    partial = token(gateway, "alice", audience=audience, scopes=["mcp.tools"])
    response = post(gateway, "scoped", partial)
    assert response.status_code == 403
    params = challenge(response)
    assert params["error"] == "insufficient_scope"
    assert params["scope"].split() == ["mcp.admin", "mcp.tools"]
    assert params["resource_metadata"] == f"{gateway.url}/.well-known/oauth-protected-resource/mcp/scoped"
    metadata = httpx.get(params["resource_metadata"]).json()
    assert metadata["scopes_supported"] == ["mcp.admin", "mcp.tools"]
    # Without any token the challenge names no scopes (they would tell which names are served): the
    # client's first request asks for those of the metadata, every server's.
    assert "scope" not in challenge(post(gateway, "scoped", None))
    full = token(gateway, "alice", audience=audience, scopes=["mcp.tools", "mcp.admin"])
    assert post(gateway, "scoped", full).status_code == 200


async def test_two_principals_see_different_tools_and_a_denied_call_never_reaches_the_upstream(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    async with sdk_client(gateway.mcp("modern"), token(gateway, "alice")) as alice:
        alice_tools = {t.name for t in (await alice.list_tools()).tools}
    httpx.post(f"{modern_upstream}/_fixture/reset")
    async with sdk_client(gateway.mcp("modern"), token(gateway, "bob")) as bob:
        bob_tools = {t.name for t in (await bob.list_tools()).tools}
        assert (await bob.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="denied by policy"):
            await bob.call_tool("whoami", {})
        with pytest.raises(MCPError, match="denied by policy"):
            await bob.call_tool("no_such_tool", {})
    assert bob_tools == {"echo", "add"}
    assert alice_tools > bob_tools and "whoami" in alice_tools
    calls = [r["name"] for r in httpx.get(f"{modern_upstream}/_fixture/received").json()]
    assert "add" in calls
    assert "whoami" not in calls and "no_such_tool" not in calls


def test_an_unknown_user_with_a_valid_token_sees_no_tools(gateway: RunningGateway) -> None:
    response = post(gateway, "modern", token(gateway, "mallory"))
    assert response.status_code == 200
    body = response.text
    message = (
        json.loads(body[body.index("{") :].splitlines()[0]) if body.startswith("event") else response.json()
    )
    assert message["result"]["tools"] == []


def test_the_token_cli_mints_a_token_the_gateway_accepts(gateway: RunningGateway) -> None:
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentgw",
            "token",
            "issue",
            "--config",
            str(gateway.config_path),
            "--database-url",
            gateway.database_url,
            "--subject",
            "bob",
            "--resource",
            f"{gateway.url}/mcp/modern",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "AGENTGW_PORT": str(urlsplit(gateway.url).port)},
    ).stdout.strip()
    assert post(gateway, "modern", minted).status_code == 200
