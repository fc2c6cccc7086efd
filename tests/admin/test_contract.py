"""The admin API answers as its OpenAPI document says, in process: the guard's answers and the bearer
scheme documented, one value per scalar query parameter, JSON types as declared, `Allow` on 405."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agentgw.app import create_app
from agentgw.oauth.server import mint_token
from agentgw.settings import load_settings

BASE = "http://127.0.0.1:8080"


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    settings = load_settings(
        None, data_dir=tmp_path, policy={"rules": ["p, role:security, admin:*, *, allow"]}
    )
    return create_app(settings)


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    keys = app.state.gateway.identity.keys
    token, _ = mint_token(keys, BASE, subject="someone", audience=f"{BASE}/admin", roles=["security"])
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url=BASE, headers=headers
    ) as client:
        yield client


def test_every_admin_operation_documents_the_bearer_scheme_401_and_403(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    operations = [
        (path, op) for path, item in paths.items() if path.startswith("/admin") for op in item.values()
    ]
    assert len(operations) >= 20
    for path, op in operations:
        assert {"401", "403"} <= set(op["responses"]), path
        assert op["security"] == [{"HTTPBearer": []}], path


async def test_a_405_names_every_method_of_the_path(http: httpx.AsyncClient) -> None:
    answer = await http.request("PATCH", "/admin/registry/servers/x")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET, PUT"
    assert answer.json() == {"detail": "Method Not Allowed"}
    # A fixed path is its own resource, though `/admin/budgets/{name}` would match it too.
    fixed = await http.request("OPTIONS", "/admin/budgets/effective")
    assert fixed.status_code == 405 and fixed.headers["allow"] == "GET"


async def test_a_scalar_query_parameter_given_twice_is_refused_a_list_one_is_not(
    http: httpx.AsyncClient,
) -> None:
    twice = await http.get("/admin/budgets/effective?subject=a&subject=b")
    assert twice.status_code == 422
    [error] = twice.json()["detail"]
    assert error["loc"] == ["query", "subject"] and error["input"] == ["a", "b"]
    roles = await http.get("/admin/budgets/effective?subject=a&role=x&role=y")
    assert roles.status_code == 200, roles.text


async def test_an_age_beyond_the_clock_reads_from_the_start_and_a_bad_time_is_a_validation_error(
    http: httpx.AsyncClient,
) -> None:
    ancient = await http.get("/admin/audit/records", params={"since": "99999999999999d"})
    assert ancient.status_code == 200, ancient.text
    bad = await http.get("/admin/audit/records", params={"until": "last week"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "until"]


async def test_bodies_are_taken_with_their_declared_json_types(http: httpx.AsyncClient) -> None:
    rule = {"name": "b1", "calls": 5.0}
    assert (await http.put("/admin/budgets/b1", json=rule)).status_code == 200  # 5.0 is an integer in JSON
    for wrong in ({"calls": "5"}, {"calls": True}, {"calls": 1, "per_resource": 0}):
        answer = await http.put("/admin/budgets/b1", json={"name": "b1", **wrong})
        assert answer.status_code == 422, wrong
    virtual = {"name": "v1", "prefix": 0}
    assert (await http.post("/admin/registry/virtual-servers", json=virtual)).status_code == 422


async def test_a_name_that_is_not_a_registry_name_is_refused_in_fastapis_shape(
    http: httpx.AsyncClient,
) -> None:
    answer = await http.get("/admin/registry/servers/Not--A-Name")
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["path", "name"]
    differ = await http.put("/admin/budgets/b2", json={"name": "b3", "calls": 1})
    assert differ.status_code == 422 and differ.json()["detail"][0]["loc"] == ["body", "name"]


def test_no_query_parameter_of_the_document_offers_null(app: FastAPI) -> None:
    # A query string has no null: `?run=null` is the string "null", and a default of null is no value.
    parameters = [
        p
        for item in app.openapi()["paths"].values()
        for op in item.values()
        for p in op.get("parameters", [])
    ]
    queries = [p for p in parameters if p["in"] == "query"]
    assert len(queries) >= 15
    for parameter in queries:
        text = str(parameter["schema"])
        assert "'null'" not in text and "'default': None" not in text, parameter
