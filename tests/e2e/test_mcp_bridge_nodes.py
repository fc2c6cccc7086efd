"""Two gateway nodes sharing Redis: a bridged session (the SDK's, held by the node that opened it)
continues through the other node, which forwards its requests to the owner; a lost owner is a lost
session (404, binding dropped), and nothing a caller sends makes a node skip a check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from agentgw.ingress.mcp.forwarding import FORWARDED_HEADER
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT, LEGACY, LEGACY_INIT, answer_of

REDIS = "redis://127.0.0.1:6379/0"
# What both nodes call themselves towards clients (token audiences); nothing listens there.
PUBLIC = "http://127.0.0.1:9"
HEADERS = {"accept": ACCEPT, "mcp-protocol-version": LEGACY}
READY = {"jsonrpc": "2.0", "method": "notifications/initialized"}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
Nodes = tuple[RunningGateway, RunningGateway, Path]


def call(text: str, call_id: int = 3) -> dict[str, Any]:
    params = {"name": "legacy__echo", "arguments": {"text": text}}
    return {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": params}


@contextmanager
def two_nodes(root: Path, legacy_upstream: str) -> Iterator[Nodes]:
    keys = root / "keys" / "oauth-keys.json"
    config = {
        "public_url": PUBLIC,
        "redis_url": REDIS,
        "auth": {"builtin": {"enabled": True, "signing_key": str(keys)}},
        "servers": [{"name": "legacy", "url": f"{legacy_upstream}/mcp"}],
        "virtual_servers": [{"name": "v", "tools": ["legacy/echo"]}],
        "policy": {"rules": ["p, user:alice, mcp:legacy/*, *, allow", "p, user:bob, mcp:legacy/*, *, allow"]},
    }
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "keys").mkdir(mode=0o700)
    # A makes the signing keys; B, started after, uses the same file.
    with run_gateway(root / "a", config) as a, run_gateway(root / "b", config) as b:
        yield a, b, keys


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, legacy_upstream: str) -> Iterator[Nodes]:
    with two_nodes(tmp_path_factory.mktemp("nodes"), legacy_upstream) as made:
        yield made


def auth(keys: Path, who: str, path: str = "/mcp") -> dict[str, str]:
    value, _ = mint_token(
        SigningKeys(keys), PUBLIC, subject=who, audience=f"{PUBLIC}{path}", client_id="tests"
    )
    return {"authorization": f"Bearer {value}"}


def open_session(node: RunningGateway, keys: Path, who: str, path: str = "/mcp") -> dict[str, str]:
    """Open a bridged session on `node`; the headers that continue it."""
    headers = HEADERS | auth(keys, who, path)
    started = httpx.post(f"{node.url}{path}", json=LEGACY_INIT, headers=headers, timeout=10)
    assert started.status_code == 200, started.text
    headers |= {"mcp-session-id": started.headers["mcp-session-id"]}
    ready = httpx.post(f"{node.url}{path}", json=READY, headers=headers, timeout=10)
    assert ready.status_code == 202, ready.text
    return headers


def test_a_bridged_session_opened_on_one_node_lists_calls_and_ends_on_the_other(nodes: Nodes) -> None:
    a, b, keys = nodes
    session = open_session(a, keys, "alice")
    listed = answer_of(httpx.post(b.mcp(), json=LIST, headers=session, timeout=10))
    assert "legacy__echo" in {tool["name"] for tool in listed["result"]["tools"]}
    answer = answer_of(httpx.post(b.mcp(), json=call("via b"), headers=session, timeout=10))
    assert answer["result"]["content"][0]["text"] == "via b"
    # Ended through B: the owner ended it and dropped its binding; no node knows it any more.
    ended = httpx.delete(b.mcp(), headers=session, timeout=10)
    assert ended.status_code in (200, 204), ended.text
    for node in (a, b):
        assert httpx.post(node.mcp(), json=LIST, headers=session, timeout=10).status_code == 404


def test_the_notification_stream_of_a_session_is_served_through_either_node(nodes: Nodes) -> None:
    a, b, keys = nodes
    session = open_session(a, keys, "alice")
    stream = session | {"accept": "text/event-stream"}
    assert httpx.post(b.mcp(), json=LIST, headers=session, timeout=10).status_code == 200
    with httpx.Client(timeout=10) as client:
        # Opened through B, then given up: the owner's stream closes with it, so one can be opened again.
        with client.stream("GET", b.mcp(), headers=stream) as first:
            assert first.status_code == 200
        with client.stream("GET", b.mcp(), headers=stream) as again:
            assert again.status_code == 200, again.read()
            changed = {"name": "legacy__notify_change", "arguments": {}}
            body = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": changed}
            assert httpx.post(a.mcp(), json=body, headers=session, timeout=10).status_code == 200
            assert "notifications/tools/list_changed" in first_message(again)["method"]


def first_message(response: httpx.Response) -> dict[str, Any]:
    """The first JSON-RPC message of an SSE stream (its priming event, with no data, skipped)."""
    for line in response.iter_lines():
        if line.startswith("data:") and line[5:].strip():
            message: dict[str, Any] = json.loads(line[5:])
            return message
    raise AssertionError("the stream ended without a message")


def test_a_stream_broken_off_resumes_through_the_other_node_with_last_event_id(nodes: Nodes) -> None:
    a, b, keys = nodes
    session = open_session(a, keys, "alice")
    slow = {"name": "legacy__slow", "arguments": {"seconds": 1}}
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": slow}
    # Sent through B; the client goes away after the priming event, before the answer exists.
    with httpx.stream("POST", b.mcp(), json=call, headers=session, timeout=10) as response:
        assert response.status_code == 200
        priming = next(line for line in response.iter_lines() if line.startswith("id:"))
    resume = session | {"accept": "text/event-stream", "last-event-id": priming[3:].strip()}
    with httpx.stream("GET", b.mcp(), headers=resume, timeout=10) as resumed:
        assert resumed.status_code == 200
        answer = first_message(resumed)
    assert answer["id"] == 7 and answer["result"]["content"][0]["text"] == "done", answer


def test_another_principal_and_a_forged_hop_header_are_refused_on_both_nodes(nodes: Nodes) -> None:
    a, b, keys = nodes
    session = open_session(a, keys, "alice")
    bob = session | auth(keys, "bob")
    for node in (a, b):
        refused = httpx.post(node.mcp(), json=LIST, headers=bob, timeout=10)
        assert refused.status_code == 404, refused.text
        forged = httpx.post(node.mcp(), json=LIST, headers=bob | {FORWARDED_HEADER: "1"}, timeout=10)
        assert forged.status_code == 404, forged.text
    # The hop header only stops forwarding: B then serves the request as its own, without the session.
    assert httpx.post(b.mcp(), json=LIST, headers=session, timeout=10).status_code == 200
    stopped = httpx.post(b.mcp(), json=LIST, headers=session | {FORWARDED_HEADER: a.url}, timeout=10)
    assert stopped.status_code == 404
    # Nobody's credentials: refused before any session is looked at.
    anonymous = {k: v for k, v in session.items() if k != "authorization"} | {FORWARDED_HEADER: "1"}
    assert httpx.post(b.mcp(), json=LIST, headers=anonymous, timeout=10).status_code == 401
    # Alice's session still works: nothing above ended it.
    assert httpx.post(b.mcp(), json=LIST, headers=session, timeout=10).status_code == 200


def test_a_session_of_another_endpoint_is_unknown_on_both_nodes(nodes: Nodes) -> None:
    a, b, keys = nodes
    virtual = open_session(a, keys, "alice", "/mcp/v")
    assert httpx.post(b.mcp("v"), json=LIST, headers=virtual, timeout=10).status_code == 200
    merged = virtual | auth(keys, "alice")
    for node in (a, b):
        assert httpx.post(node.mcp(), json=LIST, headers=merged, timeout=10).status_code == 404


def test_messages_of_an_http_sse_session_reach_it_through_the_other_node(nodes: Nodes) -> None:
    a, b, keys = nodes
    alice = auth(keys, "alice")
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{a.url}/mcp/_sse", headers=alice) as events,
    ):
        assert events.status_code == 200
        lines = events.iter_lines()
        endpoint = next(line[5:].strip() for line in lines if line.startswith("data:"))
        assert endpoint.startswith("/mcp/_messages?session_id=")
        posted = client.post(f"{b.url}{endpoint}", json=LEGACY_INIT, headers=alice)
        assert posted.status_code == 202, posted.text
        answer = next(json.loads(line[5:]) for line in lines if line.startswith("data:"))
        assert answer["id"] == 1 and "serverInfo" in answer["result"]
        # Bob, with Alice's session id, through either node: unknown.
        for node in (a, b):
            foreign = client.post(f"{node.url}{endpoint}", json=LIST, headers=auth(keys, "bob"))
            assert foreign.status_code == 404, foreign.text


def test_a_session_whose_node_is_gone_is_lost_and_its_binding_dropped(
    tmp_path: Path, legacy_upstream: str
) -> None:
    with two_nodes(tmp_path, legacy_upstream) as (a, b, keys):
        session = open_session(a, keys, "alice")
        binding = f"agentgw:mcp-session:{session['mcp-session-id']}"
        assert redis.Redis.from_url(REDIS).exists(binding)
        stream = session | {"accept": "text/event-stream"}
        with httpx.stream("GET", b.mcp(), headers=stream, timeout=10) as listening:
            assert listening.status_code == 200
            a.process.process.kill()
            a.process.process.wait(10)
            # The stream B relayed ends with its owner (the client reconnects), rather than hanging.
            lines = list(listening.iter_lines())
            assert not [line for line in lines if line.startswith("data:") and line[5:].strip()], lines
        lost = httpx.post(b.mcp(), json=LIST, headers=session, timeout=10)
        assert lost.status_code == 404, lost.text
        assert lost.json()["error"]["message"].startswith("session not found")
        assert not redis.Redis.from_url(REDIS).exists(binding)
        # A new session, on the node that is left, works.
        fresh = open_session(b, keys, "alice")
        assert httpx.post(b.mcp(), json=call("again"), headers=fresh, timeout=10).status_code == 200


@pytest.fixture(autouse=True)
def _redis_is_there() -> None:
    redis.Redis.from_url(REDIS).ping()  # the machine runs Redis; fail loudly if it does not
