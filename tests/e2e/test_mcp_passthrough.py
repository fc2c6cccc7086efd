"""The official MCP SDK client through `/mcp/{server}` to streamable-HTTP upstreams of both eras."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.support.gateway import RunningGateway, run_gateway

POLICY = [
    "p, anonymous, mcp:modern/echo, *, allow",
    "p, anonymous, mcp:modern/add, *, allow",
    "p, anonymous, mcp:modern/prompt/*, *, allow",
    "p, anonymous, mcp:modern/resource/*, *, allow",
    "p, anonymous, mcp:legacy/*, *, allow",
    "p, anonymous, mcp:legacy/roots, *, deny",
]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, legacy_upstream: str
) -> Iterator[RunningGateway]:
    config = {
        "allow_anonymous": True,
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {"name": "legacy", "url": f"{legacy_upstream}/mcp"},
        ],
        "policy": {"rules": POLICY},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def received(upstream: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{upstream}/_fixture/received").json()
    return records


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
async def test_modern_upstream_lists_only_the_allowed_tools_and_calls_them(
    gateway: RunningGateway, mode: str
) -> None:
    async with Client(gateway.mcp("modern"), mode=mode) as client:  # type: ignore[arg-type]
        tools = await client.list_tools()
        assert sorted(t.name for t in tools.tools) == ["add", "echo"]
        result = await client.call_tool("echo", {"text": "hi"})
        assert not result.is_error
        assert result.content[0].text == "hi"  # type: ignore[union-attr]


async def test_a_denied_tool_is_refused_and_never_reaches_the_upstream(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    async with Client(gateway.mcp("modern"), mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("whoami", {})
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("no_such_tool", {})
    names = [r.get("name") for r in received(modern_upstream)]
    assert "whoami" not in names and "no_such_tool" not in names


async def test_legacy_upstream_sampling_and_elicitation_reach_the_client(gateway: RunningGateway) -> None:
    from mcp_types import CreateMessageResult, ElicitResult, TextContent

    async def sampling(_ctx: Any, params: Any) -> CreateMessageResult:
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="sampled!"), model="m"
        )

    async def elicitation(_ctx: Any, params: Any) -> ElicitResult:
        return ElicitResult(action="accept", content={"answer": "yes"})

    async with Client(
        gateway.mcp("legacy"), mode="legacy", sampling_callback=sampling, elicitation_callback=elicitation
    ) as client:
        sampled = await client.call_tool("sample", {})
        assert "sampled!" in sampled.content[0].text  # type: ignore[union-attr]
        elicited = await client.call_tool("elicit", {})
        assert "yes" in elicited.content[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("roots", {})


async def test_the_callers_token_never_reaches_the_upstream(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x"}},
    }
    # Anonymous is allowed, but a bearer token without a configured issuer is refused outright.
    response = httpx.post(
        gateway.mcp("modern"),
        json=body,
        headers={"authorization": "Bearer secret-token", "accept": "application/json, text/event-stream"},
    )
    assert response.status_code == 401
    assert "resource_metadata=" in response.headers["www-authenticate"]
    assert all("secret-token" not in str(r) for r in received(modern_upstream))
    assert "secret-token" not in gateway.output()


def post(gateway: RunningGateway, server: str, content: bytes, **headers: str) -> httpx.Response:
    base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    return httpx.post(gateway.mcp(server), content=content, headers=base | headers)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, -32700),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', {}, 400, -32600),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', {}, 400, -32600),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', {}, 400, -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"}', {"content-type": "text/plain"}, 415, -32600),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}',
            {"mcp-method": "tools/list"},
            400,
            -32020,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}',
            {"mcp-method": "tools/call", "mcp-name": "whoami"},
            400,
            -32020,
        ),
    ],
)
def test_bad_input_gets_a_protocol_error_and_reaches_no_upstream(
    gateway: RunningGateway,
    modern_upstream: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: int,
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    response = post(gateway, "modern", content, **headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert received(modern_upstream) == []


def test_an_oversized_body_is_refused_with_413(gateway: RunningGateway) -> None:
    big = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * (5 * 1024 * 1024) + b'"}}'
    response = post(gateway, "modern", big)
    assert response.status_code == 413


def test_an_unknown_server_is_404(gateway: RunningGateway) -> None:
    response = post(gateway, "nope", b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "unknown MCP server 'nope'"


def test_an_unknown_session_is_404(gateway: RunningGateway) -> None:
    response = post(
        gateway, "legacy", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', **{"mcp-session-id": "forged"}
    )
    assert response.status_code == 404


async def test_a_dead_upstream_gives_a_clear_error(tmp_path: Path) -> None:
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "dead", "url": "http://127.0.0.1:9/mcp", "timeout_s": 2}],
        "policy": {"rules": ["p, anonymous, mcp:dead/*, *, allow"]},
    }
    with run_gateway(tmp_path, config) as gw:
        response = post(gw, "dead", b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}')
        assert response.json()["error"]["message"] == "upstream 'dead' is unreachable"
        assert response.json()["id"] == 7


def test_a_foreign_host_header_is_refused_against_dns_rebinding(gateway: RunningGateway) -> None:
    response = post(gateway, "modern", b'{"jsonrpc":"2.0","id":1,"method":"ping"}', host="evil.example.com")
    assert response.status_code == 400


async def test_header_values_are_compared_and_forwarded_without_surrounding_whitespace(
    gateway: RunningGateway,
) -> None:
    async with Client(gateway.mcp("modern"), mode="2026-07-28") as client:
        await client.list_tools()  # a session of the modern era, so the raw call below is well formed
    body = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {
            "name": "echo",
            "arguments": {"text": "trimmed"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    # httpx refuses to send such a header; clients written with other stacks do send it.
    connection = http.client.HTTPConnection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), timeout=10)
    connection.request(
        "POST",
        "/mcp/modern",
        body=json.dumps(body),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": "  echo  ",
        },
    )
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 200
    assert "trimmed" in text


@pytest.mark.parametrize("mode", ["2026-07-28", "auto"])
async def test_a_modern_client_reaches_a_legacy_only_upstream_at_its_own_url(
    gateway: RunningGateway, mode: str
) -> None:
    # The pass-through cannot translate eras: such requests take the bridge, which speaks both.
    async with Client(gateway.mcp("legacy"), mode=mode) as client:  # type: ignore[arg-type]
        assert "echo" in [t.name for t in (await client.list_tools()).tools]
        result = await client.call_tool("echo", {"text": "across eras"})
        assert result.content[0].text == "across eras"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("roots", {})
