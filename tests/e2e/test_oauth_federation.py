"""Users log in at the organisation's OpenID Connect provider: a real one (the npm package
`oidc-provider`, conformance/fixtures/oidc) on 127.0.0.1, its own login and consent forms submitted
by a headless browser. The MCP SDK's `OAuthClientProvider` registers at the gateway, its user signs
in at the provider, and the roles the gateway maps from the provider's groups decide what tools/list
shows; a refresh keeps those roles. Bad input: an unknown or replayed `state`, an ID token with
another sign-in's nonce, a provider that is down, a user the mapping does not allow."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urljoin, urlsplit

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from agentgw.oauth.config import IdentityProviderSettings
from agentgw.oauth.federation import FederationError, OidcLogin
from agentgw.oauth.pending import PendingLogins
from agentgw.oauth.server import hash_password
from agentgw.storage import make_engine
from conformance.fixtures.launch import REPO_ROOT, FixtureProcess, free_port, start_process
from tests.e2e.test_oauth_login import Storage, list_tools, pkce, refresh, register
from tests.support.gateway import RunningGateway, gateway_args, write_config

OIDC = REPO_ROOT / "conformance" / "fixtures" / "oidc"
REDIRECT_URI = "http://127.0.0.1:1/callback"
IDP_CLIENT = ("agentgw", "idp-test-secret")
POLICY = [
    "p, role:developer, mcp:modern/*, *, allow",
    "p, role:reader, mcp:modern/echo, *, allow",
]


@dataclasses.dataclass
class Federation:
    idp: FixtureProcess
    gateway: RunningGateway


def provider_settings(issuer: str, **overrides: Any) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "client_id": IDP_CLIENT[0],
        "client_secret": "idp",
        "display_name": "Example Corp",
        "scopes": ["openid", "email", "groups"],
        "name_claim": "sub",
        "groups_claim": "groups",
        "role_map": {"engineering": ["developer"], "sales": ["reader"]},
    } | overrides


@pytest.fixture(scope="module")
def oidc_provider_install() -> tuple[str, str]:
    """The pinned Node and oidc-provider install (once per lock file, in the shared cache)."""
    lines = subprocess.run(
        [str(OIDC.parent / "npm-install"), "oidc"], check=True, capture_output=True, text=True, timeout=600
    ).stdout.split()
    return lines[0], lines[1]


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, oidc_provider_install: tuple[str, str]
) -> Iterator[Federation]:
    node, installed = oidc_provider_install
    idp_port, gw_port = free_port(), free_port()
    callback = f"http://127.0.0.1:{gw_port}/oauth/callback"
    idp_args = [node, str(OIDC / "idp.mjs"), installed, str(idp_port), *IDP_CLIENT, callback]
    tmp = tmp_path_factory.mktemp("federation")
    (tmp / "idp-secret").write_text(IDP_CLIENT[1])
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        "secrets": {"idp": {"file": str(tmp / "idp-secret")}},
        "auth": {
            "leeway_s": 0,
            "builtin": {
                "token_ttl_s": 60,
                "registration": {"per_address_per_minute": 1000},
                # A local user beside the provider: the login page offers both.
                "users": [{"name": "carol", "password_hash": hash_password("local-pass")}],
                "identity_provider": provider_settings(f"http://127.0.0.1:{idp_port}"),
            },
        },
    }
    config_path = write_config(tmp, config)
    database_url = f"sqlite:///{tmp / 'agentgw.db'}"
    with (
        start_process(idp_args, idp_port) as idp,
        start_process(gateway_args(config_path, gw_port, database_url), gw_port) as gw,
    ):
        yield Federation(idp, RunningGateway(gw, config_path, database_url))


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), {}))
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1][1][values["name"]] = values.get("value", "")


def browse(url: str, user: str, stop: str = REDIRECT_URI) -> str | httpx.Response:
    """A headless browser: follows redirects, signs in at the provider as `user` and consents; returns
    the URL it is finally sent to under `stop`, or the page it got stuck on."""
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        response = browser.get(url)
        for _ in range(20):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if location.startswith(stop):
                    return location
                response = browser.get(location)
                continue
            parser = _Forms()
            parser.feed(response.text)
            if response.status_code != 200 or not parser.forms:
                return response
            # The gateway's page: the provider's button. The provider's pages: its login, its consent.
            action, fields = next(
                (f for f in parser.forms if f[1].get("login") == "idp" or "prompt" in f[1]), parser.forms[0]
            )
            if fields.get("prompt") == "login":
                fields |= {"login": user, "password": "any password"}
            response = browser.post(urljoin(str(response.url), action), data=fields)
        raise AssertionError(f"the browser went round in circles at {response.url}")


def authorization_url(gw: RunningGateway, client_id: str, challenge: str, state: str = "st") -> str:
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": gw.url,
    }
    return str(httpx.URL(f"{gw.url}/oauth/authorize", params=query))


def answer_of(location: str | httpx.Response) -> dict[str, str]:
    assert isinstance(location, str), (
        f"no redirect to the client: {location.status_code} {location.text[:500]}"
    )
    return dict(parse_qsl(urlsplit(location).query))


async def test_the_sdk_provider_signs_in_at_the_idp_and_the_idp_groups_decide_the_tools(
    federation: Federation,
) -> None:
    gateway = federation.gateway
    tools: dict[str, set[str]] = {}
    for user in ("alice", "bob"):
        urls: list[str] = []

        async def redirect(url: str) -> None:
            urls.append(url)  # noqa: B023  (used before the loop moves on)

        async def callback() -> AuthorizationCodeResult:
            query = answer_of(browse(urls[-1], user))  # noqa: B023
            return AuthorizationCodeResult(code=query["code"], state=query["state"])

        storage = Storage()
        provider = OAuthClientProvider(
            gateway.mcp(),
            OAuthClientMetadata(
                client_name=f"{user}'s client",
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
            tools[user] = {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("modern__echo", {"text": f"hello {user}"})
            assert result.content[0].text == f"hello {user}"  # type: ignore[union-attr]
        assert len(urls) == 1 and storage.client is not None and storage.client.client_id.startswith("agc_")
    # alice is in engineering (developer: every tool), bob in sales (reader: echo only).
    assert tools["bob"] == {"modern__echo"}
    assert tools["alice"] > tools["bob"] and "modern__whoami" in tools["alice"]


def test_the_login_page_offers_the_provider_beside_local_users_and_a_refresh_keeps_idp_roles(
    federation: Federation,
) -> None:
    gateway = federation.gateway
    client_id = register(gateway, client_name="manual").json()["client_id"]
    verifier, challenge = pkce()
    page = httpx.get(authorization_url(gateway, client_id, challenge))
    assert page.status_code == 200
    assert "Sign in with Example Corp" in page.text and 'name="password"' in page.text

    query = answer_of(browse(authorization_url(gateway, client_id, challenge, state="mine"), "alice"))
    assert query["state"] == "mine"
    tokens = httpx.post(
        f"{gateway.url}/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": REDIRECT_URI,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert tokens.status_code == 200, tokens.text
    renewed = refresh(gateway, client_id, tokens.json()["refresh_token"], resource=f"{gateway.url}/mcp")
    assert renewed.status_code == 200, renewed.text
    listed = list_tools(gateway, "/mcp", renewed.json()["access_token"])
    assert listed.status_code == 200 and "modern__whoami" in listed.text
    assert "sign-in user=alice roles=developer" in gateway.output()


def test_a_user_the_mapping_does_not_allow_gets_access_denied_and_no_code(federation: Federation) -> None:
    gateway = federation.gateway
    client_id = register(gateway, client_name="mallory's").json()["client_id"]
    _, challenge = pkce()
    query = answer_of(browse(authorization_url(gateway, client_id, challenge), "mallory"))
    assert "code" not in query
    assert query["error"] == "access_denied" and query["state"] == "st"
    assert "mallory is not allowed" in query["error_description"]


def test_an_unknown_or_replayed_state_is_refused_with_a_clear_page(federation: Federation) -> None:
    gateway = federation.gateway
    unknown = httpx.get(f"{gateway.url}/oauth/callback", params={"state": "forged", "code": "x"})
    assert unknown.status_code == 400
    assert "unknown or has expired" in unknown.text

    client_id = register(gateway, client_name="replay").json()["client_id"]
    _, challenge = pkce()
    # Stop at the gateway's callback, keep it, and deliver it twice.
    back = browse(
        authorization_url(gateway, client_id, challenge), "alice", stop=f"{gateway.url}/oauth/callback"
    )
    assert isinstance(back, str)
    first = httpx.get(back)
    assert first.status_code == 302 and "code=" in first.headers["location"]
    again = httpx.get(back)
    assert again.status_code == 400 and "unknown or has expired" in again.text


async def test_an_id_token_from_another_sign_in_is_refused_by_its_nonce(
    federation: Federation, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    gateway = federation.gateway
    settings = IdentityProviderSettings(**provider_settings(federation.idp.url, client_secret=None))
    async with httpx.AsyncClient() as http:
        login = OidcLogin(
            settings,
            redirect_uri=f"{gateway.url}/oauth/callback",
            http=http,
            pending=PendingLogins(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")),
            client_secret=lambda: IDP_CLIENT[1],
        )
        url = await login.begin({"client_id": ["c"]})
        back = browse(url, "alice", stop=f"{gateway.url}/oauth/callback")
        assert isinstance(back, str)
        query = parse_qs(urlsplit(back).query)
        pending = await login.take(query["state"][0])
        # The provider's real ID token, checked against another sign-in's nonce.
        other = dataclasses.replace(pending, nonce="another-sign-in")
        with pytest.raises(FederationError, match="could not be verified") as refused:
            await login.finish(other, query["code"][0])
        assert refused.value.status == 502
        assert "nonce does not match" in caplog.text


def test_a_provider_that_is_down_fails_closed_with_a_clear_error_to_the_client(
    tmp_path: Path, modern_upstream: str
) -> None:
    gw_port, nobody = free_port(), free_port()
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        "auth": {
            "builtin": {
                "identity_provider": provider_settings(f"http://127.0.0.1:{nobody}", client_secret=None)
            }
        },
    }
    config_path = write_config(tmp_path, config)
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    with start_process(gateway_args(config_path, gw_port, database_url), gw_port) as process:
        gateway = RunningGateway(process, config_path, database_url)
        client_id = register(gateway, client_name="down").json()["client_id"]
        _, challenge = pkce()
        answer = httpx.get(authorization_url(gateway, client_id, challenge))
        assert answer.status_code == 302
        query = answer_of(answer.headers["location"])
        assert query["error"] == "temporarily_unavailable" and query["state"] == "st"
        assert "Example Corp's sign-in cannot be reached" in query["error_description"]
        assert "code" not in query
        assert "identity provider unreachable" in gateway.output()
