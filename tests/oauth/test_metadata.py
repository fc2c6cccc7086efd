"""RFC 9728 protected resource metadata for every MCP endpoint, with the registry's scopes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agentgw.oauth.metadata import endpoint_scopes, protected_resource_router
from agentgw.registry.models import McpServerSpec, VirtualServerSpec
from agentgw.registry.store import RegistryStore
from agentgw.storage import create_db, make_engine

BASE = "https://gw.example"


@pytest.fixture
def registry(tmp_path: Path) -> RegistryStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_db(engine)
    store = RegistryStore(engine)
    store.sync_config(
        [
            McpServerSpec(name="github", url="https://up/mcp", scopes=["repo", "issues"]),
            McpServerSpec(name="docs", url="https://docs/mcp"),
            McpServerSpec(name="k8s", url="https://k8s/mcp", scopes=["cluster"]),
        ],
        [VirtualServerSpec(name="triage", tools=["github/list_issues", "docs/*"])],
    )
    return store


async def test_each_endpoint_publishes_its_resource_issuers_and_scopes(registry: RegistryStore) -> None:
    app = FastAPI()
    app.include_router(protected_resource_router(BASE, registry, lambda: [BASE, "https://idp.example"]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        doc = (await http.get("/.well-known/oauth-protected-resource/mcp/github")).json()
        assert doc["resource"] == f"{BASE}/mcp/github"
        assert doc["authorization_servers"] == [BASE, "https://idp.example"]
        # Every server's scopes, as for /mcp: a document must not tell which names are served.
        assert doc["scopes_supported"] == ["cluster", "issues", "repo"]
        assert doc["bearer_methods_supported"] == ["header"]
        merged = (await http.get("/.well-known/oauth-protected-resource/mcp")).json()
        assert merged["resource"] == f"{BASE}/mcp" and merged["scopes_supported"] == [
            "cluster",
            "issues",
            "repo",
        ]
        virtual = (await http.get("/.well-known/oauth-protected-resource/mcp/triage")).json()
        assert virtual["scopes_supported"] == ["cluster", "issues", "repo"]
        assert (await http.get("/.well-known/oauth-protected-resource/admin")).json()[
            "scopes_supported"
        ] == []
        assert (await http.get("/.well-known/oauth-protected-resource")).json()["resource"] == BASE
        for unknown in ("/mcp/GitHub", "/mcp/github/extra", "/other", "/mcp/..%2Fadmin"):
            assert (await http.get(f"/.well-known/oauth-protected-resource{unknown}")).status_code == 404, (
                unknown
            )


def test_endpoint_scopes_are_none_for_endpoints_the_gateway_does_not_serve(registry: RegistryStore) -> None:
    assert endpoint_scopes(registry, "/mcp/docs") == []
    assert endpoint_scopes(registry, "/a2a/Bad..name") is None
    assert endpoint_scopes(registry, "/a2a/triage") == [] and endpoint_scopes(registry, "/v1") == []
    assert endpoint_scopes(registry, "/v2") is None
