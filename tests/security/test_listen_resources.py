"""`subscriptions/listen` asks for updates of resources: the caller needs `read` on every URI it
names, as for `resources/read`; one it may not read refuses the whole request before any upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, modern_headers
from tests.support.tokens import bearer

READABLE = "fixture://hello"
UNREADABLE = "fixture://items/1"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": [
                "p, user:alice, mcp:modern/echo, *, allow",
                f"p, user:alice, mcp:modern/resource/{READABLE}, *, allow",
            ]
        },
        "auth": {"builtin": {"enabled": True}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def first_answer(gw: RunningGateway, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body, or the first event of the SSE stream (a listen stream stays open: not awaited)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    headers = modern_headers(method, params.get("uri")) | bearer(gw, "alice", "/mcp/modern")
    with httpx.stream("POST", gw.mcp("modern"), json=body, headers=headers, timeout=10) as response:
        if not response.headers["content-type"].startswith("text/event-stream"):
            response.read()
            answer: dict[str, Any] = response.json()
            return answer
        for line in response.iter_lines():
            if line.startswith("data:"):
                event: dict[str, Any] = json.loads(line[5:])
                return event
    raise AssertionError("the stream ended without an event")


def listen(gw: RunningGateway, uris: list[str]) -> dict[str, Any]:
    return first_answer(gw, "subscriptions/listen", {"notifications": {"resourceSubscriptions": uris}})


def listens_received(upstream: str) -> list[dict[str, Any]]:
    received = httpx.get(f"{upstream}/_fixture/received").json()
    return [r for r in received if r["method"] == "subscriptions/listen"]


def test_listening_to_a_resource_the_caller_may_not_read_is_refused(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    assert (
        "denied by policy" in first_answer(gateway, "resources/read", {"uri": UNREADABLE})["error"]["message"]
    )
    httpx.post(f"{modern_upstream}/_fixture/reset")
    for uris in ([UNREADABLE], [READABLE, UNREADABLE], [UNREADABLE, READABLE]):
        answer = listen(gateway, uris)
        assert "denied by policy" in answer["error"]["message"], uris
    assert listens_received(modern_upstream) == []


def test_listening_to_readable_resources_reaches_the_upstream(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    answer = listen(gateway, [READABLE])
    assert answer["method"] == "notifications/subscriptions/acknowledged", answer
    assert len(listens_received(modern_upstream)) == 1
