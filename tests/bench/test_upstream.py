"""The fast fixture upstream answers what the benchmark sends, in both eras, and refuses the rest."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from bench.upstream import app

MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://upstream")


async def _post(client: httpx.AsyncClient, body: Any, **headers: str) -> httpx.Response:
    return await client.post("/mcp", content=orjson.dumps(body), headers=headers)


async def test_a_modern_tools_call_is_answered_complete_with_server_info() -> None:
    async with _client() as client:
        params = {"name": "echo", "arguments": {"text": "hi"}, "_meta": MODERN_META}
        response = await _post(client, {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params})
    answer = response.json()
    assert response.status_code == 200
    assert answer["id"] == 7
    assert answer["result"]["content"] == [{"type": "text", "text": "hi"}]
    assert answer["result"]["resultType"] == "complete"
    assert "io.modelcontextprotocol/serverInfo" in answer["result"]["_meta"]


async def test_a_legacy_call_needs_the_session_that_initialize_gave() -> None:
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    async with _client() as client:
        assert (await _post(client, call)).status_code == 400
        assert (await _post(client, call, **{"mcp-session-id": "forged"})).status_code == 404
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25"},
        }
        started = await _post(client, init)
        session = started.headers["mcp-session-id"]
        assert started.json()["result"]["protocolVersion"] == "2025-11-25"
        note = await _post(client, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        answered = await _post(client, call, **{"mcp-session-id": session})
    assert note.status_code == 202
    assert answered.status_code == 200
    assert answered.json()["result"]["isError"] is False


async def test_the_upstream_lists_echo_and_refuses_unknown_tools_methods_and_bad_bodies() -> None:
    async with _client() as client:
        listed = await _post(
            client, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": MODERN_META}}
        )
        unknown_tool = await _post(
            client,
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "nope", "_meta": MODERN_META},
            },
        )
        unknown_method = await _post(
            client, {"jsonrpc": "2.0", "id": 3, "method": "nope", "params": {"_meta": MODERN_META}}
        )
        garbage = await client.post("/mcp", content=b"{not json")
        get = await client.get("/mcp")
    assert [t["name"] for t in listed.json()["result"]["tools"]] == ["echo"]
    assert listed.json()["result"]["ttlMs"] == 0
    assert unknown_tool.json()["error"]["code"] == -32602
    assert unknown_method.status_code == 404
    assert unknown_method.json()["error"]["code"] == -32601
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == -32700
    assert get.status_code == 405
