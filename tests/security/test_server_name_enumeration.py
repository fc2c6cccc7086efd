"""Without valid credentials, a server name the gateway serves and one it does not answer alike, at
`/mcp/<name>` and in the protected resource metadata, so names cannot be enumerated; stock clients
still find what they need for a known name (the challenge's metadata URL, the scopes to ask for)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conformance.fixtures.launch import stdio_command
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, modern_headers
from tests.support.tokens import bearer

KNOWN = ["modern", "scoped", "local", "mixed"]  # pass-through, pass-through with scopes, stdio, virtual
UNKNOWN = "nosuch"
LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": META}}
LEGACY = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    command, args = stdio_command()
    config = {
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {"name": "scoped", "url": f"{modern_upstream}/mcp", "scopes": ["mcp.admin"]},
            {"name": "local", "transport": "stdio", "command": command, "args": args},
        ],
        "virtual_servers": [{"name": "mixed", "tools": ["local/add"]}],
        "policy": {"rules": ["p, user:alice, mcp:modern/*, *, allow"]},
        "auth": {"builtin": {"enabled": True}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def requests_to(gw: RunningGateway, name: str) -> dict[str, httpx.Response]:
    url = gw.mcp(name)
    forged = {"authorization": "Bearer not-a-token"}
    session = {"mcp-session-id": "0123456789abcdef0123456789abcdef"}
    return {
        "POST": httpx.post(url, json=LIST, headers=modern_headers("tools/list")),
        "POST, a forged token": httpx.post(url, json=LIST, headers=modern_headers("tools/list") | forged),
        "POST, not JSON": httpx.post(url, content=b"{", headers=modern_headers("tools/list")),
        "POST, a legacy initialize": httpx.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, headers=LEGACY
        ),
        "GET": httpx.get(url, headers=LEGACY | session | {"accept": "text/event-stream"}),
        "DELETE": httpx.delete(url, headers=LEGACY | session),
    }


def seen(response: httpx.Response, name: str) -> tuple[Any, ...]:
    """What a caller sees, with the name it chose put back as a placeholder."""
    return (
        response.status_code,
        response.headers.get("content-type"),
        response.headers.get("www-authenticate", "").replace(f"/{name}", "/NAME"),
        response.text.replace(name, "NAME"),
    )


def test_known_and_unknown_names_answer_alike_without_valid_credentials(gateway: RunningGateway) -> None:
    unknown = {case: seen(r, UNKNOWN) for case, r in requests_to(gateway, UNKNOWN).items()}
    assert {answer[0] for answer in unknown.values()} == {401}
    for name in KNOWN:
        known = {case: seen(r, name) for case, r in requests_to(gateway, name).items()}
        assert known == unknown, name


def test_the_metadata_of_known_and_unknown_names_is_alike(gateway: RunningGateway) -> None:
    def document(name: str) -> tuple[int, str]:
        response = httpx.get(f"{gateway.url}/.well-known/oauth-protected-resource/mcp/{name}")
        return response.status_code, response.text.replace(name, "NAME")

    unknown = document(UNKNOWN)
    assert unknown[0] == 200
    for name in KNOWN:
        assert document(name) == unknown, name


def test_a_known_name_still_tells_a_stock_client_where_and_what_to_ask(gateway: RunningGateway) -> None:
    refused = httpx.post(gateway.mcp("scoped"), json=LIST, headers=modern_headers("tools/list"))
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    metadata_url = f"{gateway.url}/.well-known/oauth-protected-resource/mcp/scoped"
    assert f'resource_metadata="{metadata_url}"' in challenge
    metadata = httpx.get(metadata_url).json()
    assert metadata["resource"] == gateway.mcp("scoped")
    assert metadata["authorization_servers"] == [gateway.url]
    assert "mcp.admin" in metadata["scopes_supported"]


def test_with_valid_credentials_an_unknown_name_is_not_found(gateway: RunningGateway) -> None:
    headers = modern_headers("tools/list") | bearer(gateway, "alice", f"/mcp/{UNKNOWN}")
    assert httpx.post(gateway.mcp(UNKNOWN), json=LIST, headers=headers).status_code == 404
