"""What a raw MCP request carries, for tests that speak JSON-RPC without the SDK."""

from __future__ import annotations

import json
from typing import Any

import httpx

__all__ = ["ACCEPT", "LEGACY", "LEGACY_INIT", "META", "MODERN", "answer_of", "modern_headers"]

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
# The per-request `_meta` envelope every 2026-07-28 request must carry.
META: dict[str, Any] = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "agentgw-tests", "version": "1"},
}


# The handshake that opens a 2025-11-25 session, of a client that declares no capabilities.
LEGACY_INIT: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    """The headers of a 2026-07-28 POST: version, method, and the name for name-bearing methods."""
    headers = {"accept": ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": method}
    if name is not None:
        headers["mcp-name"] = name
    return headers


def answer_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC answer of a 200 response: its JSON body, or the last event of its SSE stream."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        parsed: dict[str, Any] = json.loads(data[-1])
        return parsed
    answer: dict[str, Any] = response.json()
    return answer
