"""Streams, answer sizes and server errors of pass-through upstreams, against a scripted upstream on
127.0.0.1 (real sockets, real breaks) behind the gateway running as a process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from sqlalchemy import Engine

from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery
from tests.support.audit import records_until
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, MODERN, modern_headers
from tests.support.servers import Answer, LocalServer, Received, Scripted

SSE = {"content-type": "text/event-stream"}
Tool = Callable[[Any], Answer]


def progress(n: int) -> bytes:
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": n},
    }
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def result(msg_id: Any, text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}]}}


def scripted_mcp(tools: dict[str, Tool]) -> Scripted:
    """An MCP upstream whose `tools/call` answers are scripted per tool; anything else is 404."""

    def answer(request: Received) -> Answer:
        try:
            body = json.loads(request.content)
        except ValueError:
            return Answer(404)
        if body.get("method") != "tools/call":
            return Answer(404)
        return tools[body["params"]["name"]](body["id"])

    return Scripted(answer)


async def call(gw: RunningGateway, tool: str, msg_id: int = 7) -> httpx.Response:
    params = {"name": tool, "arguments": {}, "_meta": META}
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(gw.mcp("up"), json=body, headers=modern_headers("tools/call", tool))


def events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = response.text.splitlines()
    return [json.loads(line[5:]) for line in lines if line.startswith("data:") and line[5:].strip()]


def config(server: LocalServer, **extra: Any) -> dict[str, Any]:
    limits = {"limits": extra.pop("limits")} if "limits" in extra else {}
    return {
        "allow_anonymous": True,
        "servers": [{"name": "up", "url": f"{server.url}/mcp", "timeout_s": 5, **limits}],
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow"]},
        **extra,
    }


async def outcome(engine: Engine, resource: str) -> dict[str, Any]:
    records = await records_until(
        engine, AuditQuery(resource=resource, event="outcome"), lambda records: len(records) == 1
    )
    return records[0]


@pytest.mark.parametrize(
    ("end", "detail"),
    [
        ("drop", "upstream 'up' broke off the stream"),
        ("end", "upstream 'up' ended its stream before answering"),
    ],
)
async def test_a_stream_cut_before_its_answer_ends_with_a_jsonrpc_error_and_an_error_outcome(
    tmp_path: Path, end: str, detail: str
) -> None:
    server = LocalServer()
    upstream = scripted_mcp({"cut": lambda _: Answer(200, [progress(1)], SSE, end)})  # type: ignore[arg-type]
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server)) as gw:
            response = await call(gw, "cut")
            assert response.status_code == 200
            first, last = events(response)
            assert first["method"] == "notifications/progress", "what came before the cut is relayed"
            assert last == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32603, "message": detail}}
            record = await outcome(make_engine(gw.database_url), "mcp:up/cut")
            assert "Traceback" not in gw.output(), "an upstream's break is logged in one line"
    assert (record["status"], record["reason"], record["detail"]) == (
        "upstream_error",
        "upstream_error",
        detail,
    )


async def test_a_resumable_stream_closed_before_its_answer_is_left_to_the_client_to_resume(
    tmp_path: Path,
) -> None:
    server = LocalServer()
    primed = b"id: ev-1\ndata: \n\n"  # an event id: the client may resume with Last-Event-ID
    upstream = scripted_mcp({"pause": lambda _: Answer(200, [primed, progress(1)], SSE, "end")})
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server)) as gw:
            response = await call(gw, "pause")
            assert [e for e in events(response) if "error" in e] == [], "no error is made up for it"
            record = await outcome(make_engine(gw.database_url), "mcp:up/pause")
    assert record["status"] == "stream_closed", "not recorded as a call that got its answer"


async def test_an_answered_stream_is_an_ok_outcome_recorded_when_it_ends(tmp_path: Path) -> None:
    server = LocalServer()
    answer = b"data: " + json.dumps(result(7, "done")).encode() + b"\n\n"
    upstream = scripted_mcp({"fine": lambda _: Answer(200, [progress(1), answer], SSE, "end")})
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server)) as gw:
            assert events(await call(gw, "fine"))[-1] == result(7, "done")
            record = await outcome(make_engine(gw.database_url), "mcp:up/fine")
    assert (record["status"], record["detail"]) == ("ok", None)


async def test_an_upstream_server_error_is_the_gateways_jsonrpc_error_with_502(tmp_path: Path) -> None:
    server = LocalServer()
    page = Answer(
        500, [b"<html>Internal Server Error: db 10.0.0.7 refused</html>"], {"content-type": "text/html"}
    )
    upstream = scripted_mcp({"boom": lambda _: page})
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server)) as gw:
            response = await call(gw, "boom")
            assert response.status_code == 502
            assert response.json() == {
                "jsonrpc": "2.0",
                "id": 7,
                "error": {"code": -32603, "message": "upstream 'up' failed (HTTP 500)"},
            }
            async with Client(gw.mcp("up"), mode=MODERN) as client:
                with pytest.raises(MCPError, match=r"upstream 'up' failed \(HTTP 500\)"):
                    await client.call_tool("boom", {})
            record = await outcome(make_engine(gw.database_url), "mcp:up/boom")
    assert "10.0.0.7" not in response.text
    assert record["status"] == "upstream_failed"


async def test_an_answer_larger_than_the_cap_is_refused_whole_with_a_clear_error(tmp_path: Path) -> None:
    server = LocalServer()
    big = json.dumps(result(7, "x" * 300_000)).encode()
    big_event = b"data: " + json.dumps(result(7, "y" * 300_000)).encode() + b"\n\n"
    upstream = scripted_mcp(
        {
            "big": lambda _: Answer(200, [big], {"content-type": "application/json"}),
            "big_event": lambda _: Answer(200, [progress(1), big_event[:150_000], big_event[150_000:]], SSE),
            "small": lambda msg_id: Answer(
                200, [json.dumps(result(msg_id, "ok")).encode()], {"content-type": "application/json"}
            ),
        }
    )
    # The gateway-wide cap, and a server's own below it.
    limits = {"upstream_limits": {"max_answer_bytes": 1_000_000}, "limits": {"max_answer_bytes": 100_000}}
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server, **limits)) as gw:
            response = await call(gw, "big")
            assert response.status_code == 200
            assert response.json()["error"] == {
                "code": -32603,
                "message": "upstream 'up' answered more than 100000 bytes, more than the gateway reads whole",
            }
            assert "x" * 100 not in response.text, "nothing of the answer is passed on"
            streamed = events(await call(gw, "big_event"))
            assert streamed[0]["method"] == "notifications/progress"
            assert streamed[-1]["error"]["message"] == (
                "upstream 'up' sent an event of more than 100000 bytes, more than the gateway relays"
            )
            assert len(streamed) == 2, "no part of the large event is passed on"
            assert (await call(gw, "small")).json() == result(7, "ok")


async def test_an_answer_over_the_default_cap_of_16_mib_is_refused(tmp_path: Path) -> None:
    server = LocalServer()
    huge = json.dumps(result(7, "z" * (17 * 1024 * 1024))).encode()
    upstream = scripted_mcp({"huge": lambda _: Answer(200, [huge], {"content-type": "application/json"})})
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server)) as gw:
            response = await call(gw, "huge")
    assert response.json()["error"]["message"] == (
        f"upstream 'up' answered more than {16 * 1024 * 1024} bytes, more than the gateway reads whole"
    )


async def test_a_full_streams_lane_answers_busy_while_calls_still_get_through(tmp_path: Path) -> None:
    server = LocalServer()
    long_stream = Answer(200, [progress(1)], SSE, "hang")
    upstream = scripted_mcp(
        {
            "long": lambda _: long_stream,
            "also_long": lambda _: Answer(200, [progress(1)], SSE, "hang"),
            "short": lambda msg_id: Answer(
                200, [json.dumps(result(msg_id, "ok")).encode()], {"content-type": "application/json"}
            ),
        }
    )
    limits = {"max_streams": 1, "max_connections": 4, "connect_wait_s": 0.2}
    async with server.serve(upstream):
        with run_gateway(tmp_path, config(server, limits=limits)) as gw:
            async with httpx.AsyncClient(timeout=10) as http:
                body = {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tools/call",
                    "params": {"name": "long", "arguments": {}, "_meta": META},
                }
                async with http.stream(
                    "POST", gw.mcp("up"), json=body, headers=modern_headers("tools/call", "long")
                ) as held:
                    assert held.status_code == 200
                    lines = held.aiter_lines()  # kept: a closed iterator would close the stream
                    while not (await anext(lines)).startswith("data:"):
                        pass  # until the stream is open and relaying
                    busy = await http.post(
                        gw.mcp("up"),
                        json={**body, "id": 2, "params": {**body["params"], "name": "also_long"}},
                        headers=modern_headers("tools/call", "also_long"),
                    )
                    assert busy.status_code == 503
                    assert busy.headers["retry-after"] == "1"
                    assert busy.json()["id"] == 2
                    assert (
                        busy.json()["error"]["message"] == "upstream 'up' is busy: its 1 streams are all open"
                    )
                    for msg_id in range(3, 9):
                        short = await http.post(
                            gw.mcp("up"),
                            json={**body, "id": msg_id, "params": {**body["params"], "name": "short"}},
                            headers=modern_headers("tools/call", "short"),
                        )
                        assert short.json() == result(msg_id, "ok"), "calls keep their own connections"
            records = await records_until(
                make_engine(gw.database_url),
                AuditQuery(resource="mcp:up/also_long", event="outcome"),
                lambda records: len(records) == 1,
            )
            assert "Traceback" not in gw.output()
    assert records[0]["status"] == "upstream_busy"
