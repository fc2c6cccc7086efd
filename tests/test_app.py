"""The front door: every request passes the Host check; MCP, A2A and LLM requests are then served by
their routes ahead of FastAPI's middleware stack, with the app's exception handlers; everything else,
and whatever those routes do not serve, goes through FastAPI."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from agentgw.app import MAX_REMEMBERED_HOSTS, DataPlane, GatewayApp, RememberedHostCheck, create_app
from agentgw.errors import Forbidden
from agentgw.settings import load_settings

BASE = "http://127.0.0.1:8080"
PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
JSON = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def app_for(tmp_path: Path, **more: object) -> GatewayApp:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'gw.db'}",
        allowed_hosts=["127.0.0.1"],
        allow_anonymous=True,
        policy={"rules": ["p, anonymous, mcp:*, *, allow"]},
        **more,
    )
    return create_app(settings)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[GatewayApp, httpx.AsyncClient]]:
    app = app_for(tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as client:
        yield app, client


async def test_mcp_requests_skip_fastapis_middleware_stack(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    app, client = http
    response = await client.post("/mcp/nosuch", content=PING, headers=JSON)
    assert response.status_code == 404 and response.json()["error"]["message"].startswith(
        "unknown MCP server"
    )
    assert app.middleware_stack is None, "FastAPI built its middleware stack for an MCP request"
    assert (await client.get("/healthz")).status_code == 200
    assert app.middleware_stack is not None


async def test_the_host_check_holds_on_the_mcp_front_door(http: tuple[GatewayApp, httpx.AsyncClient]) -> None:
    _, client = http
    for path in ("/mcp", "/mcp/nosuch"):
        response = await client.post(path, content=PING, headers=JSON | {"host": "evil.example.com"})
        assert response.status_code == 400 and response.text == "Invalid host header"


async def test_the_host_check_holds_on_the_control_plane_and_on_what_falls_through(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    _, client = http
    for method, path in (
        ("GET", "/healthz"),
        ("GET", "/admin/budgets"),
        ("GET", "/v1/nosuch"),
        ("PUT", "/mcp"),
    ):
        response = await client.request(method, path, headers=JSON | {"host": "evil.example.com"})
        assert response.status_code == 400 and response.text == "Invalid host header", path
    assert (await client.get("/healthz")).status_code == 200


async def test_a_host_that_passed_the_check_does_not_let_another_one_through(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    _, client = http
    for host in ("127.0.0.1:8080", "evil.example.com", "127.0.0.1:8080", "evil.example.com", None):
        headers = JSON if host is None else JSON | {"host": host}
        client.headers.pop("host", None)
        response = await client.post("/mcp/nosuch", content=PING, headers=headers)
        if host is None or host.startswith("127.0.0.1"):
            assert response.status_code == 404, host
        else:
            assert response.status_code == 400 and response.text == "Invalid host header"


async def test_the_remembered_hosts_stay_bounded_and_the_check_still_holds(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    # Every port spells an allowed host anew: callers choose them, so only so many are remembered.
    app, client = http
    for port in range(MAX_REMEMBERED_HOSTS + 36):
        response = await client.post(
            "/mcp/nosuch", content=PING, headers=JSON | {"host": f"127.0.0.1:{port}"}
        )
        assert response.status_code == 404
    front = app.front
    assert isinstance(front, RememberedHostCheck) and len(front._passed_hosts) == MAX_REMEMBERED_HOSTS
    response = await client.post("/mcp/nosuch", content=PING, headers=JSON | {"host": "evil.example.com"})
    assert response.status_code == 400


async def test_a_request_without_a_host_header_is_refused() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a request without a Host header reached the app")

    check = RememberedHostCheck(app, ["127.0.0.1"])
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"accept", b"*/*")]}
    await check(scope, _no_body, send)
    assert sent[0]["status"] == 400


async def _no_body() -> Message:
    return {"type": "http.request", "body": b""}


async def test_what_the_mcp_routes_do_not_serve_falls_through_to_fastapi(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    _, client = http
    assert (await client.put("/mcp", content=PING, headers=JSON)).status_code == 405
    for path in ("/mcp/a/b", "/mcp/", "/mcpx"):
        response = await client.post(path, content=PING, headers=JSON)
        assert response.status_code in (404, 307), path
        assert "jsonrpc" not in response.text, f"{path} reached the MCP ingress"


def test_start_up_objects_are_frozen_out_of_the_gc_while_the_gateway_runs(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    with TestClient(app, base_url=BASE):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


# --- the A2A and LLM routes: ahead of the stack too, with the exception handlers they rely on ---

DIRECT_REQUESTS = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/nosuch", None),
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", b'{"model": "nosuch", "messages": [{"role": "user", "content": "hi"}]}'),
    ("POST", "/v1/embeddings", b'{"model": "nosuch", "input": "hi"}'),
    ("POST", "/a2a/nosuch", b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}}'),
    ("GET", "/a2a/nosuch/.well-known/agent-card.json", None),
    ("GET", "/a2a/nosuch/tasks/t1", None),
]


async def test_a2a_and_llm_requests_skip_fastapis_middleware_stack(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    app, client = http
    for method, path, body in DIRECT_REQUESTS:
        response = await client.request(method, path, content=body, headers=JSON)
        assert response.status_code < 500, (path, response.text)
    assert app.middleware_stack is None, "FastAPI built its middleware stack for an A2A or LLM request"


async def test_a2a_and_llm_answers_are_the_same_as_through_the_stack(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    app, client = http

    async def through_the_stack(scope: Scope, receive: Receive, send: Send) -> None:
        await app.stack(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(through_the_stack), base_url=BASE) as stacked:
        for method, path, body in DIRECT_REQUESTS:
            direct = await client.request(method, path, content=body, headers=JSON)
            expected = await stacked.request(method, path, content=body, headers=JSON)
            assert (direct.status_code, direct.content) == (expected.status_code, expected.content), path
            unique = ("x-request-id",)  # one per call
            assert direct.headers.keys() == expected.headers.keys(), path
            assert [(k, v) for k, v in direct.headers.items() if k not in unique] == [
                (k, v) for k, v in expected.headers.items() if k not in unique
            ], path


async def test_the_host_check_holds_on_the_a2a_and_llm_front_door(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    _, client = http
    for method, path, body in DIRECT_REQUESTS:
        response = await client.request(
            method, path, content=body, headers=JSON | {"host": "evil.example.com"}
        )
        assert response.status_code == 400 and response.text == "Invalid host header", path


async def test_what_the_a2a_and_llm_routes_do_not_serve_falls_through_to_fastapi(
    http: tuple[GatewayApp, httpx.AsyncClient],
) -> None:
    app, client = http
    assert (await client.put("/v1/models", headers=JSON)).status_code == 405
    assert (await client.delete("/a2a/nosuch", headers=JSON)).status_code == 405
    response = await client.get("/v1/nosuch", headers=JSON)
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    assert app.middleware_stack is not None


async def test_a_data_plane_route_that_raises_is_answered_by_the_apps_exception_handlers(
    tmp_path: Path,
) -> None:
    app = app_for(tmp_path)

    async def refuses(request: Request) -> Response:
        raise Forbidden("denied by policy: test")

    async def not_here(request: Request) -> Response:
        raise HTTPException(status_code=418, detail="short and stout")

    async def crashes(request: Request) -> Response:
        raise RuntimeError("boom")

    routes: list[BaseRoute] = [
        Route("/v1/refuses", refuses),
        Route("/v1/teapot", not_here),
        Route("/v1/crash", crashes),
    ]
    front = DataPlane(app, routes, app.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(front), base_url=BASE) as client:
        response = await client.get("/v1/refuses")
        assert response.status_code == 403 and response.json() == {"detail": "denied by policy: test"}
        response = await client.get("/v1/teapot")
        assert response.status_code == 418 and response.json() == {"detail": "short and stout"}
        with pytest.raises(RuntimeError, match="boom"):  # the server answers 500, as it did under the stack
            await client.get("/v1/crash")


async def test_the_control_planes_body_limit_leaves_the_data_plane_alone(tmp_path: Path) -> None:
    app = app_for(tmp_path, admin_max_body_bytes=1000)
    large = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"x" * 2000 + b'"}}'
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as client:
        response = await client.put("/admin/budgets/b1", content=large, headers=JSON)
        assert response.status_code == 413
        response = await client.post("/mcp/nosuch", content=large, headers=JSON)
        assert response.status_code == 404 and "unknown MCP server" in response.json()["error"]["message"]
        response = await client.post("/v1/chat/completions", content=large, headers=JSON)
        assert response.status_code != 413 and "model" in response.text
        # A path no data-plane route serves is the control plane's: the limit holds there.
        response = await client.post("/v1/nosuch", content=large, headers=JSON)
        assert response.status_code == 413
