"""Stock MCP clients log in through the gateway: the MCP SDK's `OAuthClientProvider` registers itself
(RFC 7591), its user signs in at the built-in authorization server, it calls tools through `/mcp`,
and it refreshes without a browser; rotated refresh tokens, revocation, registration errors, the
admin view of clients, wrong-audience answers and tokens from `agentgw token issue`."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)

from agentgw.oauth.server import hash_password
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, answer_of, modern_headers
from tests.support.tokens import bearer

REDIRECT_URI = "http://127.0.0.1:1/callback"
AGENTGW = (sys.executable, "-m", "agentgw")
ALICE = ("alice", "wonderland")
TOKEN_TTL_S = 3
POLICY = [
    "p, role:developer, mcp:modern/*, *, allow",
    "p, role:security, admin:keys, *, allow",
    "g, user:alice, role:developer",
    "g, user:sec, role:security",
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        "auth": {
            # Access tokens expire within the test: refreshing is what it checks.
            "leeway_s": 0,
            "builtin": {
                "token_ttl_s": TOKEN_TTL_S,
                # Every test here registers from 127.0.0.1 (the limit: tests/oauth/test_registration.py).
                "registration": {"per_address_per_minute": 1000},
                "users": [{"name": "alice", "password_hash": hash_password("wonderland")}],
            },
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


class Storage:
    """The SDK's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def register(gw: RunningGateway | FixtureProcess, **metadata: Any) -> httpx.Response:
    body = {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"} | metadata
    return httpx.post(f"{gw.url}/oauth/register", json=body)


def login(
    gw: RunningGateway | FixtureProcess, client_id: str, resource: str, user: tuple[str, str] = ALICE
) -> dict[str, Any]:
    """The code flow by hand, as a browser and a public client do it; returns the token answer."""
    verifier, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
    }
    answer = httpx.post(f"{gw.url}/oauth/authorize", data=params | {"username": user[0], "password": user[1]})
    assert answer.status_code == 302, answer.text
    code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
    tokens = httpx.post(
        f"{gw.url}/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": client_id,
            "code_verifier": verifier,
            "resource": resource,
        },
    )
    assert tokens.status_code == 200, tokens.text
    return dict(tokens.json())


def refresh(gw: RunningGateway, client_id: str, refresh_token: str, **extra: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id} | extra
    return httpx.post(f"{gw.url}/oauth/token", data=data)


def list_tools(gw: RunningGateway | FixtureProcess, endpoint: str, access_token: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}{endpoint}",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}},
        headers=modern_headers("tools/list") | {"authorization": f"Bearer {access_token}"},
    )


async def test_the_sdk_provider_registers_logs_in_calls_tools_and_refreshes_without_a_browser(
    gateway: RunningGateway,
) -> None:
    authorization_urls: list[str] = []
    pages: list[str] = []

    async def redirect(url: str) -> None:
        authorization_urls.append(url)

    async def callback() -> AuthorizationCodeResult:
        # The user's browser, headless: the login form, the password, the redirect with the code.
        url = authorization_urls[-1]
        async with httpx.AsyncClient() as browser:
            form = await browser.get(url)
            assert form.status_code == 200, form.text
            pages.append(form.text)
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
        gateway.mcp(),
        OAuthClientMetadata(
            client_name="Stock <b>client</b>",
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]  # pydantic parses the string
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
        ),
        storage,
        redirect_handler=redirect,
        callback_handler=callback,
    )
    async with (
        httpx2.AsyncClient(auth=provider) as http,
        Client(streamable_http_client(gateway.mcp(), http_client=http), mode="2026-07-28") as client,
    ):
        result = await client.call_tool("modern__echo", {"text": "logged in"})
        assert result.content[0].text == "logged in"  # type: ignore[union-attr]
        assert storage.client is not None and storage.client.client_id.startswith("agc_")
        assert storage.client.client_secret is None
        first = storage.tokens
        assert first is not None and first.refresh_token
        # The login page names the client by its registered name, escaped; never by its id.
        assert "Stock &lt;b&gt;client&lt;/b&gt;" in pages[0] and "<b>client</b>" not in pages[0]
        assert storage.client.client_id not in pages[0].split("<form")[0]

        # The SDK refreshes when its own clock says the token has expired (it counts from the answer,
        # so after the gateway does): wait for that, then check that the gateway refuses it too.
        deadline = time.monotonic() + 15
        while provider.context.is_token_valid():
            assert time.monotonic() < deadline, "the access token never expired"
            await anyio.sleep(0.1)
        assert list_tools(gateway, "/mcp", first.access_token).status_code == 401
        result = await client.call_tool("modern__echo", {"text": "refreshed"})
        assert result.content[0].text == "refreshed"  # type: ignore[union-attr]

    assert len(authorization_urls) == 1, "the refresh needed the browser again"
    assert storage.tokens is not None
    assert storage.tokens.access_token != first.access_token
    assert storage.tokens.refresh_token not in (None, first.refresh_token), (
        "the refresh token was not rotated"
    )


def test_a_reused_refresh_token_revokes_the_whole_login(gateway: RunningGateway) -> None:
    client_id = register(gateway, client_name="reuse").json()["client_id"]
    first = login(gateway, client_id, gateway.mcp())["refresh_token"]
    rotated = refresh(gateway, client_id, first)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["refresh_token"]
    assert second != first

    reused = refresh(gateway, client_id, first)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert "used before" in reused.json()["error_description"]
    # The successor was issued in the same login: it is revoked with it.
    after = refresh(gateway, client_id, second)
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant", after.text


def test_revoking_a_refresh_token_ends_the_login(gateway: RunningGateway) -> None:
    client_id = register(gateway, client_name="revoke").json()["client_id"]
    tokens = login(gateway, client_id, gateway.mcp())
    answer = httpx.post(
        f"{gateway.url}/oauth/revoke",
        data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token", "client_id": client_id},
    )
    assert answer.status_code == 200, answer.text
    assert refresh(gateway, client_id, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_one_login_for_the_gateway_serves_every_endpoint_by_refresh(gateway: RunningGateway) -> None:
    client_id = register(gateway, client_name="everywhere").json()["client_id"]
    tokens = login(gateway, client_id, gateway.url)
    narrowed = refresh(gateway, client_id, tokens["refresh_token"], resource=f"{gateway.url}/admin")
    assert narrowed.status_code == 200, narrowed.text
    # A login for /mcp cannot be stretched to /admin.
    mcp_login = login(gateway, client_id, gateway.mcp())
    wider = refresh(gateway, client_id, mcp_login["refresh_token"], resource=f"{gateway.url}/admin")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_target"
    # The refused request did not spend the refresh token.
    assert refresh(gateway, client_id, mcp_login["refresh_token"]).status_code == 200


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"redirect_uris": ["http://evil.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://app.example/cb#frag"]}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({"client_name": "x" * 5000}, "invalid_client_metadata"),
        ({"client_name": "evil\x1b[2J"}, "invalid_client_metadata"),
        ({"logo_uri": "https://app.example/" + "a" * 9000}, "invalid_client_metadata"),
        ({"unknown_field": 1}, "invalid_client_metadata"),
        ({"token_endpoint_auth_method": "client_secret_basic"}, "invalid_client_metadata"),
        ({"grant_types": ["client_credentials"]}, "invalid_client_metadata"),
        ({"jwks_uri": "https://app.example/jwks"}, "invalid_client_metadata"),
    ],
)
def test_bad_registrations_get_rfc7591_errors_and_register_nothing(
    gateway: RunningGateway, metadata: dict[str, Any], error: str
) -> None:
    admin = bearer(gateway, "sec", "/admin")
    before = httpx.get(f"{gateway.url}/admin/clients", headers=admin).json()
    answer = register(gateway, **metadata)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == error and answer.json()["error_description"]
    assert len(answer.text) < 500  # the caller's input is not echoed back
    assert httpx.get(f"{gateway.url}/admin/clients", headers=admin).json() == before


def test_admins_list_and_revoke_registered_clients(gateway: RunningGateway) -> None:
    admin = bearer(gateway, "sec", "/admin")
    registered = register(gateway, client_name="to revoke")
    assert registered.status_code == 201, registered.text
    client_id = registered.json()["client_id"]
    assert "client_secret" not in registered.json()
    tokens = login(gateway, client_id, gateway.mcp())
    listed = {c["client_id"]: c for c in httpx.get(f"{gateway.url}/admin/clients", headers=admin).json()}
    assert listed[client_id]["client_name"] == "to revoke" and listed[client_id]["revoked"] is None
    cli = subprocess.run(
        [
            *AGENTGW,
            "clients",
            "list",
            "--config",
            str(gateway.config_path),
            "--database-url",
            gateway.database_url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert client_id in cli.stdout and "to revoke" in cli.stdout

    assert httpx.delete(f"{gateway.url}/admin/clients/{client_id}", headers=admin).status_code == 204
    assert httpx.delete(f"{gateway.url}/admin/clients/agc_nobody", headers=admin).status_code == 404
    # Revoked: its refresh tokens end, and it can no longer start a login.
    assert refresh(gateway, client_id, tokens["refresh_token"]).status_code in (400, 401)
    _, challenge = pkce()
    form = httpx.get(
        f"{gateway.url}/oauth/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "state": "st",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert form.status_code == 400 and form.json()["error"] == "invalid_client"
    # Listing clients needs the admin:keys grant.
    denied = httpx.get(f"{gateway.url}/admin/clients", headers=bearer(gateway, "alice", "/admin"))
    assert denied.status_code == 403


def test_a_token_for_another_audience_gets_a_401_naming_the_expected_one(gateway: RunningGateway) -> None:
    answer = httpx.get(f"{gateway.url}/admin/keys", headers=bearer(gateway, "sec", "/mcp"))
    assert answer.status_code == 401
    assert f"expected audience: {gateway.url}/admin" in answer.json()["detail"]
    assert (
        f'error_description="the token is not meant for {gateway.url}/admin'
        in (answer.headers["www-authenticate"])
    )
    mcp = list_tools(gateway, "/mcp/modern", bearer(gateway, "alice", "/v1")["authorization"][7:])
    assert mcp.status_code == 401
    assert f"expected audience: {gateway.url}/mcp/modern" in mcp.headers["www-authenticate"]


def test_agentgw_token_issue_mints_for_the_port_the_gateway_was_started_on(gateway: RunningGateway) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTGW_PORT", "AGENTGW_HOST")}
    assert urlsplit(gateway.url).port != 8080
    minted = subprocess.run(
        [*AGENTGW, "token", "issue", "--config", str(gateway.config_path), "--subject", "alice"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    tools = answer_of(list_tools(gateway, "/mcp", minted))["result"]["tools"]
    assert "modern__echo" in {t["name"] for t in tools}


def test_the_demo_prints_its_users_and_alice_logs_in_with_a_registered_client(tmp_path: Path) -> None:
    port = free_port()
    serve = [*AGENTGW, "serve", "--port", str(port)]
    with start_process(serve, port, env={"AGENTGW_DATA_DIR": str(tmp_path / "state")}) as demo:
        assert "alice / alice-demo" in demo.output() and "bob / bob-demo" in demo.output()
        client_id = register(demo, client_name="demo client").json()["client_id"]
        tokens = login(demo, client_id, f"{demo.url}/mcp", user=("alice", "alice-demo"))
        tools = answer_of(list_tools(demo, "/mcp", tokens["access_token"]))["result"]["tools"]
        assert {t["name"] for t in tools} == {"demo__get_weather", "demo__search_docs"}
