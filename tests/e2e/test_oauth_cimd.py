"""Client ID Metadata Documents end to end: the MCP SDK's `OAuthClientProvider` names its https
metadata document as its client id (no registration), its user signs in, it calls tools. The document
is served over https with a certificate from a test CA that `agentgw serve` is told to trust
(`fetch_ca_file`); a document that is refused (not its own, signed by a CA nobody trusts, plain http)
gives the client's browser an `invalid_client` that says why."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentgw.oauth.server import hash_password
from tests.e2e.test_oauth_login import Storage, pkce
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.servers import LocalServer, tls_ca

REDIRECT_URI = "http://127.0.0.1:1/callback"
POLICY = ["p, role:developer, mcp:modern/*, *, allow", "g, user:alice, role:developer"]


def documents_app() -> Starlette:
    async def document(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        own = f"{request.url.scheme}://{request.url.netloc}/{name}.json"
        client_id = own if name != "liar" else "https://elsewhere.example/client.json"
        return JSONResponse(
            {
                "client_id": client_id,
                "client_name": f"CIMD {name}",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            }
        )

    return Starlette(routes=[Route("/{name}.json", document)])


@pytest.fixture(scope="module")
def trusted_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    ca = tls_ca()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield ca, path


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, trusted_ca: tuple[object, Path]
) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        # The documents are on this machine: loopback must be allowed, and their CA trusted.
        "fetch_allow": ["127.0.0.1"],
        "fetch_ca_file": str(trusted_ca[1]),
        "auth": {"builtin": {"users": [{"name": "alice", "password_hash": hash_password("wonderland")}]}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


@pytest.fixture
async def documents(trusted_ca: tuple[object, Path]) -> AsyncIterator[str]:
    server = LocalServer(tls=trusted_ca[0].issue_cert("127.0.0.1"))  # type: ignore[attr-defined]
    async with server.serve(documents_app()):
        yield server.url


async def browser_login(url: str, gateway: RunningGateway, errors: list[str]) -> AuthorizationCodeResult:
    """The user's browser: the login page (or the gateway's refusal), the password, the redirect."""
    async with httpx.AsyncClient() as browser:
        page = await browser.get(url)
        if page.status_code != 200:
            errors.append(page.text)
            raise RuntimeError(f"the authorization server refused: {page.text}")
        fields = dict(parse_qsl(urlsplit(url).query))
        answer = await browser.post(
            f"{gateway.url}/oauth/authorize", data=fields | {"username": "alice", "password": "wonderland"}
        )
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0])


def provider_for(gateway: RunningGateway, document_url: str, errors: list[str]) -> OAuthClientProvider:
    urls: list[str] = []

    async def redirect(url: str) -> None:
        urls.append(url)

    async def callback() -> AuthorizationCodeResult:
        return await browser_login(urls[-1], gateway, errors)

    return OAuthClientProvider(
        gateway.mcp(),
        OAuthClientMetadata(
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]  # pydantic parses the string
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
        ),
        Storage(),
        redirect_handler=redirect,
        callback_handler=callback,
        client_metadata_url=document_url,
    )


async def test_the_sdk_provider_logs_in_with_its_https_metadata_document_and_calls_tools(
    gateway: RunningGateway, documents: str
) -> None:
    errors: list[str] = []
    provider = provider_for(gateway, f"{documents}/good.json", errors)
    async with (
        httpx2.AsyncClient(auth=provider) as http,
        Client(streamable_http_client(gateway.mcp(), http_client=http), mode="2026-07-28") as client,
    ):
        result = await client.call_tool("modern__echo", {"text": "via CIMD"})
        assert result.content[0].text == "via CIMD"  # type: ignore[union-attr]
    assert errors == []
    assert provider.context.client_info is not None
    assert provider.context.client_info.client_id == f"{documents}/good.json"
    # Nothing was registered: the document is the client.
    clients = gateway.output()
    assert "client registered" not in clients


async def test_a_document_that_is_not_its_own_fails_the_sdk_flow_with_the_reason(
    gateway: RunningGateway, documents: str
) -> None:
    errors: list[str] = []
    provider = provider_for(gateway, f"{documents}/liar.json", errors)
    with pytest.raises(Exception):  # noqa: B017  (the SDK wraps the callback's error in groups)
        async with (
            httpx2.AsyncClient(auth=provider) as http,
            Client(streamable_http_client(gateway.mcp(), http_client=http), mode="2026-07-28") as client,
        ):
            await client.list_tools()
    assert len(errors) == 1
    assert '"error":"invalid_client"' in errors[0].replace(" ", "")
    assert "client metadata document refused: the document's client_id is not its own URL" in errors[0]


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("untrusted", "client metadata document refused: the TLS certificate does not verify"),
        ("http", "client metadata document refused: a client id URL must be https"),
    ],
)
async def test_documents_the_gateway_cannot_trust_are_refused_saying_why(
    gateway: RunningGateway, where: str, reason: str
) -> None:
    # A CA the gateway was not told about; or a plain http document.
    server = LocalServer(tls=tls_ca().issue_cert("127.0.0.1") if where == "untrusted" else None)
    async with server.serve(documents_app()):
        _, challenge = pkce()
        params = {
            "response_type": "code",
            "client_id": f"{server.url}/good.json",
            "redirect_uri": REDIRECT_URI,
            "state": "st",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        async with httpx.AsyncClient() as browser:
            answer = await browser.get(f"{gateway.url}/oauth/authorize", params=params)
    assert answer.status_code == 400
    assert answer.json() == {"error": "invalid_client", "error_description": reason}
