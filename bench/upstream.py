"""A fast fixture MCP upstream for benchmarks: hand-written ASGI, JSON answers, both protocol eras.

    python -m bench upstream --port P [--server granian|uvicorn]     # MCP at http://127.0.0.1:P/mcp

It answers just what a benchmark sends: `server/discover`, `initialize` (+ `notifications/initialized`),
`ping`, `tools/list` and `tools/call` for the one tool `echo` (modern 2026-07-28 requests with
`_meta`, legacy requests on an `Mcp-Session-Id` session), plus an A2A `SendMessage` at `/a2a` and an
OpenAI-style `POST /v1/chat/completions`, so that the upstream is never what a benchmark measures.
No SDK objects, no validation beyond what routing needs: a few microseconds per request.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import orjson

__all__ = ["SERVERS", "app", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODERN: Final = "2026-07-28"
LEGACY_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
SERVER_INFO: Final = {"name": "bench-upstream", "version": "1.0.0"}
META_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_SERVER_INFO: Final = "io.modelcontextprotocol/serverInfo"
ECHO_TOOL: Final = {
    "name": "echo",
    "description": "Return `text` unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}
JSON_HEADERS: Final = [(b"content-type", b"application/json")]

_sessions: set[str] = set()


def _result(msg_id: Any, result: dict[str, Any], modern: bool, cacheable: bool = False) -> bytes:
    if modern:
        # What a 2026-07-28 SDK client validates: every result says it is complete, lists say how
        # long they may be cached and by whom, and the server names itself in `_meta`.
        result["resultType"] = "complete"
        if cacheable:
            result["ttlMs"] = 0
            result["cacheScope"] = "private"
        result["_meta"] = {META_SERVER_INFO: SERVER_INFO}
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result})


def _error(msg_id: Any, code: int, message: str) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})


def _mcp(body: dict[str, Any], session: str | None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, body and extra headers for one MCP message."""
    method = body.get("method")
    msg_id = body.get("id")
    params = body.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    modern = isinstance(meta, dict) and meta.get(META_VERSION) == MODERN
    if method is None or (isinstance(method, str) and method.startswith("notifications/")):
        return 202, b"", []
    if method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if asked in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
        new = secrets.token_hex(16)
        _sessions.add(new)
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": SERVER_INFO,
        }
        return 200, _result(msg_id, result, False), [(b"mcp-session-id", new.encode())]
    if not modern and session not in _sessions:
        if session is None:
            return 400, _error(msg_id, -32600, "Bad Request: missing Mcp-Session-Id"), []
        return 404, _error(msg_id, -32001, "Session not found"), []
    if method == "tools/call":
        if params.get("name") != "echo":
            return 200, _error(msg_id, -32602, f"Unknown tool: {params.get('name')}"), []
        arguments = params.get("arguments")
        text = arguments.get("text", "") if isinstance(arguments, dict) else ""
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        return 200, _result(msg_id, result, modern), []
    if method == "tools/list":
        return 200, _result(msg_id, {"tools": [ECHO_TOOL]}, modern, cacheable=True), []
    if method == "server/discover":
        result = {
            "supportedVersions": [MODERN, *LEGACY_VERSIONS],
            "capabilities": {"tools": {}},
        }
        return 200, _result(msg_id, result, modern, cacheable=True), []
    if method == "ping":
        return 200, _result(msg_id, {}, modern), []
    return (404 if modern else 200), _error(msg_id, -32601, f"Method not found: {method}"), []


def _a2a(body: dict[str, Any]) -> bytes:
    """A completed `SendMessage` (A2A 1.0 JSON-RPC) whose answer repeats the message's text parts."""
    params = body.get("params")
    message = params.get("message") if isinstance(params, dict) else None
    parts = message.get("parts") if isinstance(message, dict) else None
    reply = {
        "messageId": secrets.token_hex(8),
        "role": "ROLE_AGENT",
        "parts": parts if isinstance(parts, list) else [],
    }
    return orjson.dumps({"jsonrpc": "2.0", "id": body.get("id"), "result": {"message": reply}})


def _chat(body: dict[str, Any]) -> bytes:
    """An OpenAI chat completion that repeats the last message, with token usage."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else {}
    text = last.get("content", "") if isinstance(last, dict) else ""
    text = text if isinstance(text, str) else ""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "bench"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
        }
    )


async def _read(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    all_headers = [*JSON_HEADERS, *headers] if body else headers
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application: `/mcp`, `/a2a`, `/v1/chat/completions`."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    method = scope["method"]
    if method == "DELETE" and path == "/mcp":
        session = _header(scope, b"mcp-session-id")
        _sessions.discard(session or "")
        await _respond(send, 200, b"", [])
        return
    if method != "POST":
        await _respond(send, 405, b"", [(b"allow", b"POST")])
        return
    raw = await _read(receive)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        await _respond(send, 400, _error(None, -32700, "Parse error"), [])
        return
    if not isinstance(body, dict):
        await _respond(send, 400, _error(None, -32600, "Invalid Request"), [])
        return
    if path == "/mcp":
        status, answer, headers = _mcp(body, _header(scope, b"mcp-session-id"))
        await _respond(send, status, answer, headers)
    elif path == "/a2a":
        await _respond(send, 200, _a2a(body), [])
    elif path == "/v1/chat/completions":
        await _respond(send, 200, _chat(body), [])
    else:
        await _respond(send, 404, b"", [])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


SERVERS: Final = ("granian", "uvicorn")


def serve(port: int, server: str = "uvicorn", host: str = "127.0.0.1") -> None:
    """Serve `app` on `host:port` until interrupted; uvicorn by default (it measured faster here)."""
    if server == "granian":
        try:
            from granian.constants import Interfaces, Loops
            from granian.log import LogLevels
            from granian.server import Server
        except ImportError:
            server = "uvicorn"
        else:
            Server(
                "bench.upstream:app",
                address=host,
                port=port,
                interface=Interfaces.ASGI,
                loop=Loops.uvloop,
                log_level=LogLevels.warning,
                log_access=False,
                working_dir=None,
            ).serve()
            return
    import uvicorn

    uvicorn.run(
        app, host=host, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False
    )


if __name__ == "__main__":  # pragma: no cover - `python -m bench upstream` is the entry point
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("PORT", "8765")))
