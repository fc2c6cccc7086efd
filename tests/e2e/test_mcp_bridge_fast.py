"""The 2026-07-28 fast path of bridged endpoints (`modern_bridge`) answers as the SDK's server does.

Two gateways with the same configuration and upstreams, one with `bridge_fast_path` on (the default)
and one with it off (the SDK serves every 2026-07-28 request); every request, good or bad, is sent to
both, and the answers (status, content type, JSON-RPC body) and the audit records it leaves must be
the same.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp import Client

from conformance.fixtures.launch import FIXTURES_DIR, free_port, start_process
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, MODERN, modern_headers

PARAM_TOOL = "test_x_mcp_header"  # of the everything fixture: declares `region` with "x-mcp-header"


@pytest.fixture(scope="module")
def everything() -> Iterator[str]:
    port = free_port()
    args = [sys.executable, str(FIXTURES_DIR / "mcp_everything.py"), "--port", str(port)]
    with start_process(args, port) as process:
        yield f"{process.url}/mcp"


def _config(modern_upstream: str, everything: str, fast: bool) -> dict[str, Any]:
    return {
        "allow_anonymous": True,
        "bridge_fast_path": fast,
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {"name": "every", "url": everything},
            # Every tool of this one waits for an administrator's approval.
            {"name": "pinned", "url": f"{modern_upstream}/mcp", "pinning": "approve"},
        ],
        "virtual_servers": [{"name": "picked", "tools": ["modern/echo", "modern/add"], "prefix": False}],
        "policy": {
            "rules": [
                "p, anonymous, mcp:modern/*, *, allow",
                "p, anonymous, mcp:modern/add, *, deny",
                "p, anonymous, mcp:every/*, *, allow",
                "p, anonymous, mcp:pinned/*, *, allow",
                "p, anonymous, admin:audit, read, allow",
            ]
        },
    }


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, everything: str
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    with (
        run_gateway(tmp_path_factory.mktemp("fast"), _config(modern_upstream, everything, True)) as fast,
        run_gateway(tmp_path_factory.mktemp("sdk"), _config(modern_upstream, everything, False)) as sdk,
    ):
        yield fast, sdk


def _request(method: str, params: dict[str, Any] | None = None, msg_id: Any = 7) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    body["params"] = {"_meta": META} if params is None else params
    return body


def _call(name: str, arguments: Any, meta: Any = META) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if meta is not None:
        params["_meta"] = meta
    return _request("tools/call", params)


def _call_headers(name: str) -> dict[str, str]:
    return modern_headers("tools/call", name) | {"content-type": "application/json"}


def _list_headers(method: str) -> dict[str, str]:
    return modern_headers(method) | {"content-type": "application/json"}


# (path, body as bytes or JSON, headers as (name, value) pairs)
Case = tuple[str, Any, list[tuple[str, str]]]

CASES: dict[str, Case] = {
    # Served.
    "tools/list": ("", _request("tools/list"), list(_list_headers("tools/list").items())),
    "tools/list, virtual": ("picked", _request("tools/list"), list(_list_headers("tools/list").items())),
    "prompts/list": ("", _request("prompts/list"), list(_list_headers("prompts/list").items())),
    "resources/list": ("", _request("resources/list"), list(_list_headers("resources/list").items())),
    "templates/list": (
        "",
        _request("resources/templates/list"),
        list(_list_headers("resources/templates/list").items()),
    ),
    "tools/call": (
        "",
        _call("modern__echo", {"text": "hi"}),
        list(_call_headers("modern__echo").items()),
    ),
    "tools/call, virtual": (
        "picked",
        _call("echo", {"text": "hi"}),
        list(_call_headers("echo").items()),
    ),
    "prompts/get": (
        "",
        _request("prompts/get", {"name": "modern__greet", "arguments": {"name": "Ann"}, "_meta": META}),
        list((modern_headers("prompts/get", "modern__greet") | {"content-type": "application/json"}).items()),
    ),
    "resources/read": (
        "",
        _request("resources/read", {"uri": "modern+fixture://hello", "_meta": META}),
        list(
            (
                modern_headers("resources/read", "modern+fixture://hello")
                | {"content-type": "application/json"}
            ).items()
        ),
    ),
    "completion/complete": (
        "",
        _request(
            "completion/complete",
            {
                "ref": {"type": "ref/prompt", "name": "modern__greet"},
                "argument": {"name": "name", "value": "a"},
                "_meta": META,
            },
        ),
        list(_list_headers("completion/complete").items()),
    ),
    # Left to the SDK.
    "ping": ("", _request("ping"), list(_list_headers("ping").items())),
    "server/discover": ("", _request("server/discover"), list(_list_headers("server/discover").items())),
    "notification": (
        "",
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        list(_list_headers("notifications/initialized").items()),
    ),
    "malformed JSON": ("", b'{"jsonrpc": "2.0", "id": 1,', list(_list_headers("tools/list").items())),
    "no Accept of SSE": (
        "",
        _request("tools/list"),
        list((_list_headers("tools/list") | {"accept": "application/json"}).items()),
    ),
    "not JSON content": (
        "",
        _request("tools/list"),
        list((_list_headers("tools/list") | {"content-type": "text/plain"}).items()),
    ),
    # Refused by the envelope checks.
    "batch": ("", [_request("tools/list")], list(_list_headers("tools/list").items())),
    "null id": ("", _request("tools/list", msg_id=None), list(_list_headers("tools/list").items())),
    "no method": ("", {"jsonrpc": "2.0", "id": 1}, list(_list_headers("tools/list").items())),
    "wrong Mcp-Method": ("", _request("tools/list"), list(_list_headers("prompts/list").items())),
    "wrong Mcp-Name": ("", _call("modern__echo", {"text": "hi"}), list(_call_headers("modern__add").items())),
    "unsupported version": (
        "",
        _request("tools/list", {"_meta": {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}}),
        list((_list_headers("tools/list") | {"mcp-protocol-version": "2099-01-01"}).items()),
    ),
    "header and body versions differ": (
        "",
        _request("tools/list"),
        list((_list_headers("tools/list") | {"mcp-protocol-version": "2099-01-01"}).items()),
    ),
    "duplicated Mcp-Method": (
        "",
        _request("tools/list"),
        [*_list_headers("tools/list").items(), ("mcp-method", "tools/list")],
    ),
    "missing _meta": (
        "",
        _call("modern__echo", {"text": "hi"}, meta=None),
        list(_call_headers("modern__echo").items()),
    ),
    "unknown method": ("", _request("tools/nothing"), list(_list_headers("tools/nothing").items())),
    "invalid params": (
        "",
        _call("modern__echo", "not an object"),
        list(_call_headers("modern__echo").items()),
    ),
    "invalid cursor": (
        "",
        _request("tools/list", {"cursor": "not-a-cursor", "_meta": META}),
        list(_list_headers("tools/list").items()),
    ),
    # Refused by the bridge and its pipeline (these leave audit records).
    "unknown tool": ("", _call("modern__nothing", {}), list(_call_headers("modern__nothing").items())),
    "unknown server": ("", _call("nowhere__echo", {}), list(_call_headers("nowhere__echo").items())),
    "forbidden tool": ("picked", _call("add", {"a": 1, "b": 2}), list(_call_headers("add").items())),
    "tool waiting for approval": (
        "",
        _call("pinned__echo", {"text": "hi"}),
        list(_call_headers("pinned__echo").items()),
    ),
    "Mcp-Param mismatch": (
        "",
        _call(f"every__{PARAM_TOOL}", {"region": "eu"}),
        [*_call_headers(f"every__{PARAM_TOOL}").items(), ("mcp-param-region", "us")],
    ),
    "Mcp-Param served": (
        "",
        _call(f"every__{PARAM_TOOL}", {"region": "eu"}),
        [*_call_headers(f"every__{PARAM_TOOL}").items(), ("mcp-param-region", "eu")],
    ),
}


def _send(gateway: RunningGateway, case: Case, run: str) -> tuple[int, str, Any, list[tuple[Any, ...]]]:
    path, body, headers = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        gateway.mcp(path or None),
        content=content,
        headers=httpx.Headers([*headers, ("agent-run-id", run)]),
        timeout=30,
    )
    answer = (
        response.json()
        if response.content and response.headers.get("content-type", "").startswith("application/json")
        else response.text
    )
    records = httpx.get(f"{gateway.url}/admin/audit/records", params={"run_id": run}, timeout=30).json()
    audit = [(r["event"], r["resource"], r["action"], r["reason"]) for r in records["records"]]
    return response.status_code, response.headers.get("content-type", ""), answer, audit


@pytest.mark.parametrize("name", list(CASES))
def test_the_fast_path_answers_and_audits_as_the_sdk_does(
    gateways: tuple[RunningGateway, RunningGateway], name: str
) -> None:
    fast, sdk = gateways
    run = f"fast-{uuid.uuid4().hex[:12]}"
    assert _send(fast, CASES[name], run) == _send(sdk, CASES[name], run)


def test_bad_requests_are_refused_with_the_sdk_status(
    gateways: tuple[RunningGateway, RunningGateway],
) -> None:
    # The comparison above holds for a pair that agrees on anything; these pin what both answer.
    fast, _ = gateways
    statuses = {name: _send(fast, CASES[name], f"st-{uuid.uuid4().hex[:12]}")[0] for name in CASES}
    assert {n: s for n, s in statuses.items() if s != 200} == {
        "ping": 404,  # no method of 2026-07-28
        "notification": 202,
        "malformed JSON": 400,
        "no Accept of SSE": 406,
        "not JSON content": 400,
        "batch": 400,
        "null id": 400,
        "no method": 400,
        "wrong Mcp-Method": 400,
        "wrong Mcp-Name": 400,
        "unsupported version": 400,
        "header and body versions differ": 400,
        "duplicated Mcp-Method": 400,
        "missing _meta": 400,
        "unknown method": 404,
        "invalid params": 400,
        "invalid cursor": 400,
        "Mcp-Param mismatch": 400,
    }


def test_refusals_by_the_pipeline_leave_their_records(
    gateways: tuple[RunningGateway, RunningGateway],
) -> None:
    fast, _ = gateways
    run = f"deny-{uuid.uuid4().hex[:12]}"
    status, _, answer, audit = _send(fast, CASES["forbidden tool"], run)
    assert status == 200 and answer["error"]["code"] == -32003
    assert [(event, resource, reason) for event, resource, _, reason in audit] == [
        ("decision", "mcp:modern/add", "denied_by_policy")
    ]


async def test_the_sdk_client_lists_and_calls_through_the_fast_path(
    gateways: tuple[RunningGateway, RunningGateway],
) -> None:
    fast, _ = gateways
    async with Client(fast.mcp(), mode=MODERN) as client:
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        assert "modern__echo" in tools and "modern__add" not in tools
        result = await client.call_tool("modern__echo", {"text": "fast"})
        assert result.content[0].text == "fast"  # type: ignore[union-attr]
    async with Client(fast.mcp("picked"), mode=MODERN) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["echo"]
        assert (await client.call_tool("echo", {"text": "v"})).content[0].text == "v"  # type: ignore[union-attr]


async def test_progress_is_streamed_by_the_sdk_path(gateways: tuple[RunningGateway, RunningGateway]) -> None:
    fast, _ = gateways
    seen: list[float] = []

    async def on_progress(progress: float, _total: float | None, _message: str | None) -> None:
        seen.append(progress)

    async with Client(fast.mcp(), mode=MODERN) as client:
        result = await client.call_tool("modern__progress", {}, progress_callback=on_progress)
    assert not result.is_error
    assert len(seen) == 3


async def test_a_server_added_later_joins_the_merged_catalog(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str
) -> None:
    # The merged endpoint is built once per registry snapshot: a change must still show at once.
    config = {
        "allow_anonymous": True,
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow", "p, anonymous, admin:registry, *, allow"]},
    }
    with run_gateway(tmp_path_factory.mktemp("late"), config) as gw:
        async with Client(gw.mcp(), mode=MODERN) as client:
            assert (await client.list_tools()).tools == []
        added = httpx.post(
            f"{gw.url}/admin/registry/servers", json={"name": "late", "url": f"{modern_upstream}/mcp"}
        )
        assert added.status_code == 201, added.text
        async with Client(gw.mcp(), mode=MODERN) as client:
            assert "late__echo" in [t.name for t in (await client.list_tools()).tools]
            assert (await client.call_tool("late__echo", {"text": "x"})).content[0].text == "x"  # type: ignore[union-attr]
