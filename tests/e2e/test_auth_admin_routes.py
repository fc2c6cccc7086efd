"""Every admin route, found by walking the OpenAPI document, refuses anonymous callers (401) and
principals without the admin grant (403); nothing admin hides from the document."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from agentgw.app import create_app
from agentgw.oauth.server import mint_token
from agentgw.settings import load_settings

BASE = "http://127.0.0.1:8080"
POLICY = [
    "p, role:security, admin:*, *, allow",
    "p, role:auditor, admin:audit, read, allow",
    "p, role:developer, mcp:*, *, allow",
]


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = load_settings(None, data_dir=tmp_path, policy={"rules": POLICY})
    yield create_app(settings)


def bearer(app: FastAPI, *roles: str, audience: str = f"{BASE}/admin") -> dict[str, str]:
    keys = app.state.gateway.identity.keys
    token, _ = mint_token(keys, BASE, subject="someone", audience=audience, roles=roles)
    return {"authorization": f"Bearer {token}"}


def admin_operations(app: FastAPI) -> list[tuple[str, str]]:
    operations = [
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        if path.startswith("/admin")
        for method in item
    ]
    assert len(operations) >= 8, operations  # registry, policies, keys, budgets, audit at least
    return operations


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_admin_route_in_the_openapi_document_needs_a_token_and_the_grant(app: FastAPI) -> None:
    nobody = bearer(app, "developer")
    auditor = bearer(app, "auditor")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        for method, path in admin_operations(app):
            url = concrete(path)
            anonymous = await http.request(method, url, json={})
            assert anonymous.status_code == 401, (method, path)
            assert "resource_metadata=" in anonymous.headers["www-authenticate"], (method, path)
            wrong_audience = await http.request(
                method, url, json={}, headers=bearer(app, "security", audience=f"{BASE}/mcp")
            )
            assert wrong_audience.status_code == 401, (method, path)
            ungranted = await http.request(method, url, json={}, headers=nobody)
            assert ungranted.status_code == 403, (method, path)
            if not path.startswith("/admin/audit") or method != "GET":
                assert (await http.request(method, url, json={}, headers=auditor)).status_code == 403, (
                    method,
                    path,
                )


async def test_a_granted_principal_gets_past_the_guard(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        answer = await http.get("/admin/policies", headers=bearer(app, "security"))
        assert answer.status_code == 200
        assert {r["rule"] for r in answer.json()["rules"]} >= {"p, role:security, admin:*, *, allow"}
        keys = await http.get("/admin/keys", headers=bearer(app, "security"))
        assert keys.status_code == 200 and keys.json() == []


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, also inside included routers (FastAPI keeps those as nested route objects)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        nested = getattr(route, "original_router", None) or getattr(route, "app", None)
        if isinstance(nested, APIRouter):
            yield from api_routes(nested.routes)


def test_no_admin_route_is_hidden_from_the_openapi_document(app: FastAPI) -> None:
    documented = set(admin_operations(app))
    found = {
        (method, route.path)
        for route in api_routes(app.routes)
        if route.path.startswith("/admin")
        for method in route.methods - {"HEAD"}
    }
    assert found and found <= documented, found - documented
