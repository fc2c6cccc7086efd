"""What the bridge keeps per handshake-era client session (decision 0011): its log level, its
resource subscriptions, and its stream events for resumption; each reaches only that client."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conformance.fixtures.launch import FIXTURES_DIR, free_port, start_process
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT

LEGACY = "2025-11-25"
HEADERS = {"accept": ACCEPT, "mcp-protocol-version": LEGACY}
WATCHED = "test://watched-resource"
FORBIDDEN = "test://static-text"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    port = free_port()
    args = [sys.executable, str(FIXTURES_DIR / "mcp_everything.py"), "--port", str(port)]
    with start_process(args, port) as process:
        config = {
            "allow_anonymous": True,
            "servers": [
                {"name": "every", "url": f"{process.url}/mcp"},
                {"name": "modern", "url": f"{modern_upstream}/mcp"},
            ],
            "virtual_servers": [{"name": "plain", "resources": ["every/*"], "prefix": False}],
            "policy": {
                "rules": [
                    "p, anonymous, mcp:every/*, *, allow",
                    "p, anonymous, mcp:modern/*, *, allow",
                    f"p, anonymous, mcp:every/resource/{FORBIDDEN}, *, deny",
                ]
            },
        }
        with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
            yield gw


def rpc(message_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "method": method, "params": params or {}}


def open_session(url: str) -> str:
    init = rpc(
        1,
        "initialize",
        {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    )
    started = httpx.post(url, json=init, headers=HEADERS)
    assert started.status_code == 200, started.text
    session = started.headers["mcp-session-id"]
    ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    done = httpx.post(url, json=ready, headers=HEADERS | {"mcp-session-id": session})
    assert done.status_code == 202, done.text
    return session


def events_of(lines: list[str]) -> list[dict[str, str]]:
    """SSE events (id, data, retry) from the lines of a stream."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if current:
                events.append(current)
            current = {}
            continue
        field, _, value = line.partition(":")
        current[field] = current.get(field, "") + value.removeprefix(" ")
    if current:
        events.append(current)
    return events


# --- resumable streams ---


def test_a_post_stream_is_primed_and_resumes_with_last_event_id(gateway: RunningGateway) -> None:
    url = gateway.mcp()
    session = open_session(url)
    headers = HEADERS | {"mcp-session-id": session}
    call = rpc(7, "tools/call", {"name": "modern__slow", "arguments": {"seconds": 1}})
    # The client goes away after the first event, before the answer exists.
    with httpx.stream("POST", url, json=call, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        lines: list[str] = []
        for line in response.iter_lines():
            if not line:
                break
            lines.append(line)
    [priming] = events_of(lines)
    assert priming["data"] == "" and priming["id"], priming
    assert int(priming["retry"]) > 0

    resume = headers | {"accept": "text/event-stream", "last-event-id": priming["id"]}
    answer = None
    with httpx.stream("GET", url, headers=resume, timeout=10) as resumed:
        assert resumed.status_code == 200
        for line in resumed.iter_lines():
            if line.startswith("data:") and line[5:].strip():
                answer = json.loads(line[5:])
                break  # the stream stays open for what else the session sends
    assert answer is not None and answer["id"] == 7, answer
    assert answer["result"]["content"][0]["text"] == "done"


def test_an_event_id_of_another_session_resumes_nothing(gateway: RunningGateway) -> None:
    url = gateway.mcp()
    owner, other = open_session(url), open_session(url)
    call = rpc(3, "tools/call", {"name": "modern__echo", "arguments": {"text": "secret"}})
    answered = httpx.post(url, json=call, headers=HEADERS | {"mcp-session-id": owner})
    [priming, *_] = events_of(answered.text.splitlines())
    assert "secret" in answered.text

    with httpx.stream(
        "GET",
        url,
        headers=HEADERS
        | {"mcp-session-id": other, "accept": "text/event-stream", "last-event-id": priming["id"]},
        timeout=httpx.Timeout(10, read=1),
    ) as response:
        seen = b""
        try:
            for chunk in response.iter_bytes():
                seen += chunk
        except httpx.ReadTimeout:
            pass  # nothing replayed: the stream stays open and silent
    assert b"secret" not in seen
