"""The pass-through in-process, against a scripted upstream on 127.0.0.1: however a call ends, its
answer is closed and its place in the upstream's lane given back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from agentgw.call import ANONYMOUS, Call, Principal, Reply
from agentgw.errors import Forbidden
from agentgw.ingress.mcp.passthrough import PassThrough, header_map
from agentgw.ingress.mcp.sessions import MemorySessionStore
from agentgw.pipeline import CallNext, Pipeline
from agentgw.registry.models import McpServerSpec, UpstreamLimits
from agentgw.upstream.http import DEFAULT_LIMITS
from agentgw.upstream.mcp import McpHttpUpstream
from tests.support.mcp import META, modern_headers
from tests.support.servers import Answer, LocalServer, Received, Scripted


@dataclass
class Stage:
    """Admits every call as `user:test`; refuses on the way back while `refuse` is set."""

    refuse: bool = False

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        call.principal = Principal("user:test")
        reply = await call_next(call)
        if self.refuse:
            raise Forbidden("refused on the way back")
        return reply


def answer(request: Received) -> Answer:
    body = json.loads(request.content)
    name = body["params"]["name"]
    if name == "sse":
        result = {"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}
        return Answer(
            200, [b"data: " + json.dumps(result).encode() + b"\n\n"], {"content-type": "text/event-stream"}
        )
    if name == "refused":  # relayed as it is
        return Answer(400, [b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"no"}}'])
    result = {"jsonrpc": "2.0", "id": body["id"], "result": {"content": []}}
    return Answer(200, [json.dumps(result).encode()], {"content-type": "application/json"})


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[httpx.AsyncClient, Stage]]:
    server = LocalServer()
    stage = Stage()
    # One place for calls and one for streams: a place not given back makes the next call "busy".
    limits = DEFAULT_LIMITS.over(UpstreamLimits(max_connections=1, max_streams=1, connect_wait_s=0.2))
    upstream = McpHttpUpstream(limits=limits)
    passthrough = PassThrough(Pipeline([stage]), upstream, MemorySessionStore(), 64 * 1024)
    spec = McpServerSpec(name="up", url=f"{server.url}/mcp", timeout_s=5)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await passthrough.serve(scope, receive, send, spec, header_map(scope), ANONYMOUS)

    transport = httpx.ASGITransport(app)
    async with (
        server.serve(Scripted(answer)),
        httpx.AsyncClient(transport=transport, base_url="http://gw") as http,
    ):
        try:
            yield http, stage
        finally:
            await upstream.aclose()


async def call(http: httpx.AsyncClient, tool: str, msg_id: int) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {}, "_meta": META},
    }
    return await http.post("/mcp/up", json=body, headers=modern_headers("tools/call", tool))


@pytest.mark.parametrize("tool", ["json", "sse", "refused"])
async def test_an_answer_refused_on_the_way_back_is_closed_and_its_place_given_back(
    gateway: tuple[httpx.AsyncClient, Stage], tool: str
) -> None:
    http, stage = gateway
    stage.refuse = True
    for msg_id in (1, 2, 3):
        refused = await call(http, tool, msg_id)
        assert refused.json()["error"]["message"] == "refused on the way back"
    stage.refuse = False
    for msg_id in (4, 5, 6):
        served = await call(http, tool, msg_id)
        assert "busy" not in served.text
        assert served.status_code == (400 if tool == "refused" else 200)
