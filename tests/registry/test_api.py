"""The registry's admin API checks a server before storing it: one it could not run is refused with 422
and a message naming the problem (never where a secret lives), and nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgw.app import GatewayApp, create_app
from agentgw.oauth.server import mint_token
from agentgw.settings import load_settings

BASE = "http://127.0.0.1:8080"


@pytest.fixture
async def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.delenv("REGISTRY_TEST_UNSET", raising=False)
    monkeypatch.setenv("REGISTRY_TEST_KEY", "k-123")
    settings = load_settings(
        None,
        data_dir=tmp_path,
        policy={"rules": ["p, role:operator, admin:registry, *, allow"]},
        secrets={
            "unset": {"env": "REGISTRY_TEST_UNSET", "send_to": ["http://127.0.0.1:9/"]},
            "key": {"env": "REGISTRY_TEST_KEY", "send_to": ["http://127.0.0.1:9/"]},
        },
    )
    app: GatewayApp = create_app(settings)
    token, _ = mint_token(
        app.state.gateway.identity.keys, BASE, subject="ops", audience=f"{BASE}/admin", roles=["operator"]
    )
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, headers=headers) as http:
        yield http


def server(name: str, secret: str) -> dict[str, Any]:
    return {"name": name, "url": "http://127.0.0.1:9/mcp", "credential": {"mode": "static", "secret": secret}}


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("nope", "unknown secret 'nope'"), ("unset", "secret 'unset' cannot be read")],
)
async def test_a_server_whose_secret_cannot_be_read_is_refused_and_nothing_is_stored(
    admin: httpx.AsyncClient, secret: str, problem: str
) -> None:
    added = await admin.post("/admin/registry/servers", json=server("vault", secret))
    assert added.status_code == 422 and problem in added.json()["detail"][0]["msg"]
    assert "REGISTRY_TEST_UNSET" not in added.text
    replaced = await admin.put("/admin/registry/servers/vault", json=server("vault", secret))
    assert replaced.status_code == 422
    assert (await admin.get("/admin/registry/servers")).json() == []


async def test_a_server_whose_secret_is_readable_is_stored_and_its_status_is_ok(
    admin: httpx.AsyncClient,
) -> None:
    assert (await admin.post("/admin/registry/servers", json=server("vault", "key"))).status_code == 201
    status = (await admin.get("/admin/registry/status")).json()
    assert status == [{"name": "vault", "owner": "api", "state": "ok", "problem": None}]
