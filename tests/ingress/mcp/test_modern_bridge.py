"""Which 2026-07-28 requests the bridge's fast path serves itself and which it leaves to the SDK, with
the body the SDK then reads intact (that its answers are the SDK's: tests/e2e/test_mcp_bridge_fast.py)."""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
import pytest
from mcp.server import Server
from starlette.types import Message, Receive, Scope, Send

from agentgw.ingress.mcp.modern_bridge import ModernEntry
from tests.support.mcp import META, modern_headers


class Fallback:
    """An ASGI app that records the bodies it read and answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def serve(
    body: bytes, *, method: str = "POST", extra: dict[str, str] | None = None, chunk: int = 0
) -> tuple[int, bytes, Fallback, list[tuple[str, dict[str, Any]]]]:
    headers = modern_headers("tools/list") | {"content-type": "application/json"} | (extra or {})
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": "/mcp",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    dispatched: list[tuple[str, dict[str, Any]]] = []

    async def dispatch(method: str, params: dict[str, Any], _version: str) -> dict[str, Any]:
        dispatched.append((method, params))
        # What 2026-07-28 requires of a list result.
        return {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}

    fallback = Fallback()
    server: Server[Any] = Server("t")
    # The SDK's handler, which the fast path must not call (it calls `dispatch`).
    server.add_request_handler("tools/list", types.PaginatedRequestParams, Fallback)
    entry = ModernEntry(server, fallback, {"tools/list"}, max_body_bytes=2000)
    await entry(scope, receive, send, headers, dispatch)
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), fallback, dispatched


def request(method: str = "tools/list", meta: dict[str, Any] = META) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"_meta": meta}}).encode()


async def test_a_served_method_is_answered_without_the_sdk() -> None:
    status, body, fallback, dispatched = await serve(request(), chunk=40)
    assert status == 200 and fallback.bodies == []
    assert [m for m, _ in dispatched] == ["tools/list"]
    answer = json.loads(body)
    assert answer["id"] == 1 and answer["result"]["tools"] == []
    assert answer["result"]["resultType"] == "complete"
    assert answer["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "t"


@pytest.mark.parametrize(
    "body",
    [
        request("ping"),
        request("subscriptions/listen"),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode(),
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {"x": NaN}}}',
        request(meta={**META, "progressToken": "p"}),
        request(meta={**META, "progressToken": True}),
    ],
    ids=[
        "another method",
        "listen",
        "notification",
        "what orjson cannot parse",
        "a progress token",
        "an invalid one",
    ],
)
async def test_what_it_does_not_serve_goes_to_the_sdk_with_the_body_intact(body: bytes) -> None:
    status, _, fallback, dispatched = await serve(body, chunk=25)
    assert (status, fallback.bodies, dispatched) == (299, [body], [])


@pytest.mark.parametrize(
    ("method", "extra"),
    [("GET", {}), ("POST", {"content-type": "text/plain"}), ("POST", {"accept": "application/json"})],
)
async def test_what_the_sdk_refuses_before_the_body_goes_to_it(method: str, extra: dict[str, str]) -> None:
    status, _, fallback, dispatched = await serve(request(), method=method, extra=extra)
    assert (status, fallback.bodies, dispatched) == (299, [request()], [])


@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_over_the_limit_is_refused_as_the_sdk_refuses_it(declared: bool) -> None:
    body = request(meta={**META, "pad": "x" * 3000})
    extra = {"content-length": str(len(body))} if declared else {}
    status, answer, fallback, dispatched = await serve(body, extra=extra, chunk=500)
    assert (status, answer, fallback.bodies, dispatched) == (413, b"Request body too large", [], [])
