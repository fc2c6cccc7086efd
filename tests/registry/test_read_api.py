"""The MCP Registry read API (/v0.1): every entry a valid server.json (the official schema, vendored in
tests/registry/schemas/) whose remote is the gateway's own URL, and each caller shown only the servers
the policy lets it discover; bad input gets a clear error and reveals nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from agentgw.app import GatewayApp, create_app
from agentgw.oauth.server import mint_token
from agentgw.registry.models import McpServerSpec
from agentgw.settings import load_settings

BASE = "http://127.0.0.1:8080"
NS = "127.0.0.1"
SCHEMAS = Path(__file__).parent / "schemas"
SERVER_SCHEMA = json.loads((SCHEMAS / "server.schema.2025-12-11.json").read_text())
OPENAPI = yaml.safe_load((SCHEMAS / "registry-openapi.yaml").read_text())
UPSTREAM = "http://127.0.0.1:9/secret-upstream-path"

POLICY = [
    "p, role:dev, mcp:*, *, allow",
    # Break glass: nobody may use gamma, so nobody is shown it.
    "p, *, mcp:gamma/*, *, deny",
    # Readers use one tool of beta; the server itself is published to them.
    "p, role:reader, mcp:beta/get_weather, call, allow",
    "p, role:reader, mcp:beta, list, allow",
    # One tool of delta, and no grant on the server: delta stays unlisted for them.
    "p, role:reader, mcp:delta/ping, *, allow",
]


def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    # The OpenAPI document's schemas are JSON Schema 2020-12, referring to each other under components.
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": OPENAPI["components"]}
    return jsonschema.Draft202012Validator(schema)


SERVER_LIST = _validator("ServerList")
SERVER_RESPONSE = _validator("ServerResponse")
SERVER_JSON = jsonschema.Draft7Validator(SERVER_SCHEMA)


@dataclass
class Registry:
    app: GatewayApp
    http: httpx.AsyncClient

    def headers(self, subject: str, *roles: str, audience: str = f"{BASE}/mcp") -> dict[str, str]:
        keys = self.app.state.gateway.identity.keys
        token, _ = mint_token(keys, BASE, subject=subject, audience=audience, roles=list(roles))
        return {"authorization": f"Bearer {token}"}

    async def names(self, subject: str, *roles: str, query: str = "") -> list[str]:
        answer = await self.http.get(f"/v0.1/servers{query}", headers=self.headers(subject, *roles))
        assert answer.status_code == 200, answer.text
        return [entry["server"]["name"] for entry in checked_list(answer.json())]


def checked_list(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`body`'s entries, once it and each of its server.json documents passed the official schemas."""
    SERVER_LIST.validate(body)
    for entry in body["servers"]:
        SERVER_JSON.validate(entry["server"])
    assert body["metadata"]["count"] == len(body["servers"])
    entries: list[dict[str, Any]] = body["servers"]
    return entries


def spec(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "url": f"{UPSTREAM}/{name}", **fields}


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        policy={"rules": POLICY},
        servers=[
            spec("alpha", title="Alpha", description="The first server", version="1.2.0+build.7"),
            spec("beta"),
            spec("gamma"),
            spec("delta"),
        ],
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        yield Registry(app, http)


async def test_each_caller_sees_only_the_servers_the_policy_lets_it_discover(registry: Registry) -> None:
    assert await registry.names("alice", "dev") == [f"{NS}/alpha", f"{NS}/beta", f"{NS}/delta"]
    assert await registry.names("bob", "reader") == [f"{NS}/beta"]
    assert await registry.names("nobody") == []


async def test_an_entry_is_a_server_json_whose_remote_is_the_gateway_never_the_upstream(
    registry: Registry,
) -> None:
    answer = await registry.http.get("/v0.1/servers", headers=registry.headers("alice", "dev"))
    alpha = checked_list(answer.json())[0]
    assert alpha["server"] == {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": f"{NS}/alpha",
        "title": "Alpha",
        "description": "The first server",
        "version": "1.2.0+build.7",
        "remotes": [{"type": "streamable-http", "url": f"{BASE}/mcp/alpha"}],
    }
    official = alpha["_meta"]["io.modelcontextprotocol.registry/official"]
    assert official["status"] == "active" and official["isLatest"] is True
    assert "secret-upstream-path" not in answer.text and "127.0.0.1:9" not in answer.text


async def test_pages_follow_the_cursor_to_the_end_and_together_are_the_whole_list(registry: Registry) -> None:
    headers = registry.headers("alice", "dev")
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        body = (await registry.http.get("/v0.1/servers", params=params, headers=headers)).json()
        seen += [entry["server"]["name"] for entry in checked_list(body)]
        cursor = body["metadata"].get("nextCursor")
        if not cursor:
            break
    assert seen == [f"{NS}/alpha", f"{NS}/beta", f"{NS}/delta"]


async def test_search_is_a_case_blind_substring_of_the_name(registry: Registry) -> None:
    assert await registry.names("alice", "dev", query="?search=ALP") == [f"{NS}/alpha"]
    assert await registry.names("alice", "dev", query="?search=gamma") == []


async def test_one_server_and_its_versions_answer_as_the_list_does(registry: Registry) -> None:
    headers = registry.headers("alice", "dev")
    versions = await registry.http.get(f"/v0.1/servers/{NS}%2Falpha/versions", headers=headers)
    assert [e["server"]["version"] for e in checked_list(versions.json())] == ["1.2.0+build.7"]
    for version in ("latest", "1.2.0%2Bbuild.7"):
        one = await registry.http.get(f"/v0.1/servers/{NS}%2Falpha/versions/{version}", headers=headers)
        assert one.status_code == 200, one.text
        SERVER_RESPONSE.validate(one.json())
        SERVER_JSON.validate(one.json()["server"])
    beta = await registry.http.get(f"/v0.1/servers/{NS}%2Fbeta/versions/latest", headers=headers)
    assert beta.json()["server"]["version"] == "0.0.0"  # a server that declares none
    missing = await registry.http.get(f"/v0.1/servers/{NS}%2Falpha/versions/9.9.9", headers=headers)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        f"/v0.1/servers/{NS}%2Fgamma/versions",  # exists, but denied to everyone
        f"/v0.1/servers/{NS}%2Fnope/versions",  # does not exist
        f"/v0.1/servers/{NS}%2Fgamma/versions/latest",
        "/v0.1/servers/alpha/versions",  # no namespace
        "/v0.1/servers/other.ns%2Falpha/versions",  # another namespace
        "/v0.1/servers/..%2F..%2Fadmin/versions",
        "/v0.1/servers/%00%2Falpha/versions",
        f"/v0.1/servers/{NS}%2F{'a' * 5000}/versions",
    ],
)
async def test_a_hidden_or_odd_name_gets_the_same_404_as_a_missing_one(registry: Registry, path: str) -> None:
    answer = await registry.http.get(path, headers=registry.headers("alice", "dev"))
    assert (answer.status_code, answer.json()) == (404, {"detail": "Server not found"})


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("?cursor=!!!", 400, "invalid cursor"),
        ("?cursor=%FF%FE", 400, "invalid cursor"),
        ("?cursor=" + "A" * 1000, 422, "at most"),
        ("?limit=1000", 422, "less than or equal to 100"),
        ("?limit=0", 422, "greater than or equal to 1"),
        ("?limit=ten", 422, "valid integer"),
        ("?updated_since=yesterday", 422, "datetime"),
        ("?search=" + "x" * 201, 422, "at most 200"),
        ("?limit=1&limit=2", 422, "give this parameter once"),
    ],
)
async def test_bad_query_input_gets_a_clear_error(
    registry: Registry, query: str, status: int, words: str
) -> None:
    answer = await registry.http.get(f"/v0.1/servers{query}", headers=registry.headers("alice", "dev"))
    assert answer.status_code == status, answer.text
    assert words in answer.text


async def test_a_caller_without_a_token_for_mcp_gets_the_oauth_challenge(registry: Registry) -> None:
    bare = await registry.http.get("/v0.1/servers")
    assert bare.status_code == 401
    assert (
        'resource_metadata="http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp"'
        in (bare.headers["www-authenticate"])
    )
    admin_token = registry.headers("alice", "dev", audience=f"{BASE}/admin")
    assert (await registry.http.get("/v0.1/servers", headers=admin_token)).status_code == 401
    for path in (f"/v0.1/servers/{NS}%2Falpha/versions", f"/v0.1/servers/{NS}%2Falpha/versions/latest"):
        assert (await registry.http.get(path)).status_code == 401


async def test_changes_and_removals_show_up_for_readers_of_what_changed_since(registry: Registry) -> None:
    headers = registry.headers("alice", "dev")
    first = (await registry.http.get("/v0.1/servers", headers=headers)).json()
    mark = max(e["_meta"]["io.modelcontextprotocol.registry/official"]["updatedAt"] for e in first["servers"])
    store = registry.app.state.gateway.registry
    store.put_server(McpServerSpec.model_validate(spec("epsilon")))
    store.remove_server("epsilon")
    store.put_server(McpServerSpec.model_validate(spec("zeta", version="2.0.0")))
    store.put_server(McpServerSpec.model_validate(spec("zeta", version="2.1.0")), replace=True)

    changed = (
        await registry.http.get("/v0.1/servers", params={"updated_since": mark}, headers=headers)
    ).json()
    by_name = {e["server"]["name"]: e for e in checked_list(changed)}
    assert sorted(by_name) == [f"{NS}/epsilon", f"{NS}/zeta"]
    assert (
        by_name[f"{NS}/epsilon"]["_meta"]["io.modelcontextprotocol.registry/official"]["status"] == "deleted"
    )
    assert by_name[f"{NS}/zeta"]["server"]["version"] == "2.1.0"
    # Without `updated_since` (or include_deleted), a removed server is not listed.
    assert f"{NS}/epsilon" not in await registry.names("alice", "dev")
    assert f"{NS}/epsilon" in await registry.names("alice", "dev", query="?include_deleted=true")
    gone = await registry.http.get(f"/v0.1/servers/{NS}%2Fepsilon/versions/latest", headers=headers)
    assert gone.status_code == 404


async def test_the_namespace_is_the_configured_one(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        policy={"rules": POLICY},
        servers=[spec("alpha")],
        registry={"namespace": "com.example.gw"},
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        registry = Registry(app, http)
        assert await registry.names("alice", "dev") == ["com.example.gw/alpha"]


@pytest.mark.parametrize("namespace", ["a/b", "", "has space", "x" * 101])
def test_a_namespace_the_schema_would_refuse_is_a_config_error(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        load_settings(None, data_dir=tmp_path, registry={"namespace": namespace})
