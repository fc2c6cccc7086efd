"""Scenarios on three nodes behind nginx: budgets exact across nodes, legacy sessions that hop nodes
(pass-through and bridged), policy edits seen by every node, a login at the built-in server whose
every step reaches another node, and a node killed under load."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from agentgw.oauth.server import hash_password
from bench.cluster import Cluster, Node
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import free_port, start_process
from tests.cluster.conftest import bearer
from tests.e2e.test_oauth_login import pkce
from tests.support.mcp import LEGACY, LEGACY_INIT, META, modern_headers

BUDGET = 12
HEADERS = {"accept": "application/json, text/event-stream", "mcp-protocol-version": LEGACY}
REDIRECT_URI = "http://127.0.0.1:1/callback"


@pytest.fixture(scope="module")
def agents() -> Iterator[str]:
    port = free_port()
    with start_process(agents_args(("echo",), port), port) as process:
        yield process.url


@pytest.fixture(scope="module")
def cluster_extra(agents: str, legacy_upstream: str) -> dict[str, Any]:
    return {
        "a2a_agents": [{"name": "echo", "card_url": f"{agents}/echo/.well-known/agent-card.json"}],
        # A 2025-11-25 upstream whose `notify_change` makes the bridge announce a changed list.
        "servers": [{"name": "late", "url": f"{legacy_upstream}/mcp", "timeout_s": 30}],
        "policy": {
            "database": True,
            "rules": [
                "p, anonymous, mcp:up/*, *, allow",
                "p, user:ops, admin:policies, *, allow",
                "p, user:ops, admin:audit, *, allow",
                "p, user:alice, a2a:echo/*, *, allow",
                "p, user:bob, a2a:echo/*, *, allow",
                "p, user:alice, mcp:up/*, *, allow",
                "p, user:alice, mcp:late/*, *, allow",
                "p, user:bob, mcp:up/*, *, allow",
            ],
        },
        "budgets": {
            # Only the budget test's runs: the other tests make more calls than that in one run.
            "rules": [{"name": "cluster-run", "per": "run", "match": "budget-*", "calls": BUDGET}],
        },
        "auth": {
            "builtin": {
                "users": [{"name": "carol", "password_hash": hash_password("carol-pass")}],
                "clients": [{"client_id": "app", "redirect_uris": [REDIRECT_URI]}],
            }
        },
    }


def tool_call(name: str, arguments: dict[str, Any], call_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": call_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": META},
    }


async def test_a_run_budget_admits_exactly_its_calls_over_every_node(cluster: Cluster) -> None:
    run = f"budget-{uuid.uuid4().hex}"
    headers = modern_headers("tools/call", "echo") | {"agent-run-id": run}
    httpx.post(f"{cluster.upstream}/_fixture/reset", timeout=10).raise_for_status()
    # No keep-alive towards nginx: each call is a new connection, spread round robin.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> httpx.Response:
            body = tool_call("echo", {"text": f"{run}-{i}"}, i)
            return await client.post(cluster.mcp("up"), json=body, headers=headers)

        answers = await asyncio.gather(*(one(i) for i in range(3 * BUDGET)))
    admitted = [a for a in answers if a.status_code == 200 and "result" in a.json()]
    refused = [a for a in answers if a not in admitted]
    assert len(admitted) == BUDGET, [a.text for a in refused][:3]
    assert all(a.json()["error"]["code"] == -32029 for a in refused), refused[0].text
    assert len({a.headers["x-node"] for a in answers}) == len(cluster.nodes)
    received = httpx.get(f"{cluster.upstream}/_fixture/received", timeout=10).json()
    assert len([r for r in received if r["method"] == "tools/call"]) == BUDGET


def test_a_legacy_session_continues_on_whichever_node_takes_each_request(cluster: Cluster) -> None:
    nodes: set[str] = set()
    with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        started = client.post(cluster.mcp("up"), json=LEGACY_INIT, headers=HEADERS)
        assert started.status_code == 200, started.text
        nodes.add(started.headers["x-node"])
        headers = HEADERS | {"mcp-session-id": started.headers["mcp-session-id"]}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert client.post(cluster.mcp("up"), json=note, headers=headers).status_code == 202
        for i in range(2, 8):
            body = {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": f"hop{i}"}},
            }
            answer = client.post(cluster.mcp("up"), json=body, headers=headers)
            assert answer.status_code == 200 and f"hop{i}" in answer.text, answer.text
            nodes.add(answer.headers["x-node"])
    assert len(nodes) == len(cluster.nodes)


def test_a_policy_edit_on_one_node_is_enforced_by_every_node(cluster: Cluster) -> None:
    admin = bearer(cluster, "ops", "/admin")
    rule = {"rule": "p, anonymous, mcp:up/echo, *, deny"}
    edited = httpx.post(f"{cluster.nodes[0].url}/admin/policies/rules", json=rule, headers=admin, timeout=10)
    assert edited.status_code in (200, 201), edited.text
    started = time.monotonic()
    pending = {node.name for node in cluster.nodes}

    def denied(node: Node) -> bool:
        body = tool_call("echo", {"text": "x"})
        answer = httpx.post(
            f"{node.url}/mcp/up", json=body, headers=modern_headers("tools/call", "echo"), timeout=10
        )
        return bool(answer.json().get("error", {}).get("code") == -32003)

    seen: dict[str, float] = {}
    try:
        while pending and time.monotonic() - started < 10:
            for node in cluster.nodes:
                if node.name not in pending:
                    continue
                if denied(node):
                    pending.discard(node.name)
                    seen[node.name] = time.monotonic() - started
            time.sleep(0.05)
        print("policy edit enforced after (s):", {k: round(v, 2) for k, v in seen.items()})
        assert not pending, f"nodes still allowing after 10 s: {pending}"
        # Each node reads the policy version twice a second, so about a second covers every node; the
        # bound leaves room for a loaded CI machine, the printed times show the real spread.
        assert max(seen.values()) < 3.0, seen
    finally:
        removed = httpx.post(
            f"{cluster.nodes[0].url}/admin/policies/rules/delete", json=rule, headers=admin, timeout=10
        )
        assert removed.status_code == 204, removed.text
        # The next tests need every node to allow again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(denied(node) for node in cluster.nodes):
            time.sleep(0.1)


def a2a(url: str, method: str, params: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    answer = httpx.post(url, json=body, headers=headers | {"a2a-version": "1.0"}, timeout=30)
    result: dict[str, Any] = answer.json()
    return result


def test_an_a2a_task_belongs_to_its_creator_on_every_node(cluster: Cluster) -> None:
    alice = bearer(cluster, "alice", "/a2a/echo")
    bob = bearer(cluster, "bob", "/a2a/echo")
    message = {"role": "ROLE_USER", "messageId": uuid.uuid4().hex, "parts": [{"text": "hi"}]}
    sent = a2a(
        f"{cluster.url}/a2a/echo", "SendMessage", {"message": message, "metadata": {"skill": "shout"}}, alice
    )
    task = sent["result"]["task"]["id"]
    for node in cluster.nodes:
        own = a2a(f"{node.url}/a2a/echo", "GetTask", {"id": task}, alice)
        assert own.get("result", {}).get("id") == task, (node.name, own)
        # Another principal gets what it would get for a task that does not exist, on every node.
        foreign = a2a(f"{node.url}/a2a/echo", "GetTask", {"id": task}, bob)
        assert foreign["error"]["code"] == -32001, (node.name, foreign)


def test_a_login_hops_nodes_at_every_step_and_finishes(cluster: Cluster) -> None:
    verifier, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT_URI,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": f"{cluster.url}/mcp",
    }
    # No keep-alive: nginx deals each request to the next node.
    with httpx.Client(
        base_url=cluster.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:
        page = client.get("/oauth/authorize", params=params)
        assert page.status_code == 200 and 'name="password"' in page.text, page.text
        signed_in = client.post(
            "/oauth/authorize", data=params | {"username": "carol", "password": "carol-pass"}
        )
        assert signed_in.status_code == 302, signed_in.text
        code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": "app",
            "code_verifier": verifier,
        }
        tokens = client.post("/oauth/token", data=form)
        assert tokens.status_code == 200, tokens.text
        renewed = client.post(
            "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens.json()["refresh_token"],
                "client_id": "app",
            },
        )
        assert renewed.status_code == 200, renewed.text
        replayed = client.post("/oauth/token", data=form)
        assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"
    steps = [page, signed_in, tokens, renewed]
    assert signed_in.headers["x-node"] != tokens.headers["x-node"]
    assert len({step.headers["x-node"] for step in steps}) == len(cluster.nodes)


def _node_of(cluster: Cluster, x_node: str) -> Node:
    """The node nginx names in `X-Node` (`127.0.0.1:<port>`)."""
    return next(node for node in cluster.nodes if x_node == f"127.0.0.1:{node.port}")


def _open_bridged(
    client: httpx.Client, cluster: Cluster, auth: dict[str, str]
) -> tuple[dict[str, str], Node]:
    """A bridged session on `/mcp` opened through nginx: the headers that continue it, its owner."""
    started = client.post(f"{cluster.url}/mcp", json=LEGACY_INIT, headers=HEADERS | auth)
    assert started.status_code == 200, started.text
    headers = HEADERS | auth | {"mcp-session-id": started.headers["mcp-session-id"]}
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert client.post(f"{cluster.url}/mcp", json=note, headers=headers).status_code == 202
    return headers, _node_of(cluster, started.headers["x-node"])


def _first_message(stream: httpx.Response) -> dict[str, Any]:
    """The first JSON-RPC message of an SSE stream (its priming event, with no data, skipped)."""
    for line in stream.iter_lines():
        if line.startswith("data:") and line[5:].strip():
            message: dict[str, Any] = json.loads(line[5:])
            return message
    raise AssertionError("the stream ended without a message")


LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


async def test_a_bridged_sdk_session_hops_nodes_on_every_request(
    cluster: Cluster, legacy_upstream: str
) -> None:
    httpx.post(f"{legacy_upstream}/_fixture/reset", timeout=10).raise_for_status()
    alice = bearer(cluster, "alice", "/mcp")
    nodes: list[str] = []
    sessions: set[str] = set()
    changed = anyio.Event()

    async def seen(response: httpx2.Response) -> None:
        nodes.append(response.headers.get("x-node", ""))
        if "mcp-session-id" in response.headers:
            sessions.add(response.headers["mcp-session-id"])

    async def on_message(message: Any) -> None:
        if getattr(getattr(message, "root", message), "method", "") == "notifications/tools/list_changed":
            changed.set()

    http = create_mcp_http_client(headers=alice)
    http.event_hooks["response"].append(seen)
    transport = streamable_http_client(f"{cluster.url}/mcp", http_client=http)
    async with (
        http,
        Client(transport, mode="legacy", message_handler=on_message) as client,
    ):
        assert {"up__echo", "late__notify_change"} <= {t.name for t in (await client.list_tools()).tools}
        for i in range(6):
            result = await client.call_tool("up__echo", {"text": f"hop{i}"})
            assert result.content[0].text == f"hop{i}"  # type: ignore[union-attr]
        # Announced on the session's notification stream, wherever nginx sent its GET.
        await client.call_tool("late__notify_change", {})
        with anyio.fail_after(10):
            await changed.wait()
        [session] = sessions
        # Another principal with that session id: unknown on every node.
        bob = HEADERS | bearer(cluster, "bob", "/mcp") | {"mcp-session-id": session}
        async with httpx.AsyncClient(timeout=10) as plain:
            for node in cluster.nodes:
                refused = await plain.post(f"{node.url}/mcp", json=LIST, headers=bob)
                assert refused.status_code == 404, (node.name, refused.text)
    assert len(set(nodes)) == len(cluster.nodes), nodes
    httpx.post(f"{legacy_upstream}/_fixture/reset", timeout=10).raise_for_status()


def test_a_bridged_notification_stream_reconnects_on_another_node(
    cluster: Cluster, legacy_upstream: str
) -> None:
    alice = bearer(cluster, "alice", "/mcp")
    with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        session, owner = _open_bridged(client, cluster, alice)
        assert client.post(f"{cluster.url}/mcp", json=LIST, headers=session).status_code == 200
        first, second = [node for node in cluster.nodes if node is not owner]
        stream = session | {"accept": "text/event-stream"}
        with client.stream("GET", f"{first.url}/mcp", headers=stream) as dropped:
            assert dropped.status_code == 200
        # The client is back, on another node: the owner let the first stream go with its client.
        with client.stream("GET", f"{second.url}/mcp", headers=stream) as again:
            assert again.status_code == 200
            body = {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "late__notify_change"},
            }
            assert client.post(f"{cluster.url}/mcp", json=body, headers=session).status_code == 200
            assert _first_message(again)["method"] == "notifications/tools/list_changed"
    httpx.post(f"{legacy_upstream}/_fixture/reset", timeout=10).raise_for_status()


async def test_an_http_sse_session_takes_its_messages_on_every_node(cluster: Cluster) -> None:
    posted: list[str] = []
    sessions: list[str] = []

    async def seen(response: httpx2.Response) -> None:
        if response.request.method == "POST":
            posted.append(response.headers.get("x-node", ""))

    def factory(
        headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None
    ) -> httpx2.AsyncClient:
        http = create_mcp_http_client(headers, timeout, auth)
        http.event_hooks["response"].append(seen)
        return http

    # Bounded: a message the session never gets would leave the SDK waiting for its answer.
    with anyio.fail_after(60):
        await _sse_session_on_every_node(cluster, factory, sessions)
    assert len(set(posted)) == len(cluster.nodes), posted


async def _sse_session_on_every_node(cluster: Cluster, factory: Any, sessions: list[str]) -> None:
    alice = bearer(cluster, "alice", "/mcp")
    async with (
        sse_client(
            f"{cluster.url}/mcp/_sse",
            headers=alice,
            httpx_client_factory=factory,
            on_session_created=sessions.append,
        ) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert "up__echo" in {t.name for t in (await session.list_tools()).tools}
        for i in range(4):
            result = await session.call_tool("up__echo", {"text": f"sse{i}"})
            assert result.content[0].text == f"sse{i}"  # type: ignore[union-attr]
        bob = bearer(cluster, "bob", "/mcp")
        async with httpx.AsyncClient(timeout=10) as plain:
            for node in cluster.nodes:
                url = f"{node.url}/mcp/_messages?session_id={sessions[0]}"
                refused = await plain.post(url, json=LIST, headers=bob)
                assert refused.status_code == 404, (node.name, refused.text)


def test_when_a_bridged_sessions_node_dies_the_session_is_lost_and_a_new_one_works(cluster: Cluster) -> None:
    alice = bearer(cluster, "alice", "/mcp")
    with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        session, owner = _open_bridged(client, cluster, alice)
        cluster.kill(owner)
        try:
            for node in cluster.nodes:
                if node is not owner:
                    lost = client.post(f"{node.url}/mcp", json=LIST, headers=session)
                    assert lost.status_code == 404, (node.name, lost.text)
            fresh, _ = _open_bridged(client, cluster, alice)
            call = {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "up__echo", "arguments": {"text": "fresh"}},
            }
            for _ in range(3):
                answer = client.post(f"{cluster.url}/mcp", json=call, headers=fresh)
                assert answer.status_code == 200 and "fresh" in answer.text, answer.text
        finally:
            cluster.stop(owner)
            cluster.start(owner)


# Last: it kills and restarts a node.
async def test_a_node_killed_under_load_loses_only_its_calls_in_flight(cluster: Cluster) -> None:
    httpx.post(f"{cluster.upstream}/_fixture/reset", timeout=10).raise_for_status()
    run = uuid.uuid4().hex
    victim = cluster.nodes[1]
    headers = modern_headers("tools/call", "echo") | {"agent-run-id": run}
    calls, concurrency = 120, 8
    answers: list[httpx.Response | Exception] = []
    done = asyncio.Event()

    async with httpx.AsyncClient(timeout=30) as client:

        async def worker(first: int) -> None:
            for i in range(first, calls, concurrency):
                try:
                    body = tool_call("echo", {"text": f"{run}-{i}"}, i)
                    answers.append(await client.post(cluster.mcp("up"), json=body, headers=headers))
                except httpx.TransportError as exc:
                    answers.append(exc)
                if len(answers) >= calls // 4:
                    done.set()

        load = asyncio.gather(*(worker(k) for k in range(concurrency)))
        await done.wait()
        cluster.kill(victim)
        await load

    failed = [
        a for a in answers if isinstance(a, Exception) or a.status_code != 200 or "result" not in a.json()
    ]
    # Only calls in flight on the dead node may fail: at most one per client connection.
    assert len(failed) <= concurrency, [a if isinstance(a, Exception) else a.text for a in failed][:3]
    assert len(answers) - len(failed) >= calls - concurrency

    # Every call the upstream received was decided and recorded first, the dead node's included.
    received = httpx.get(f"{cluster.upstream}/_fixture/received", timeout=10).json()
    forwarded = len([r for r in received if r["method"] == "tools/call"])
    auditor = bearer(cluster, "ops", "/admin")
    records = httpx.get(
        f"{cluster.nodes[0].url}/admin/audit/records",
        params={"run_id": run, "decision": "allowed", "event": "decision", "limit": 1000},
        headers=auditor,
        timeout=30,
    )
    assert records.status_code == 200, records.text
    assert len(records.json()["records"]) >= forwarded > 0

    # The chains of all nodes, the dead one's included, verify.
    verified = httpx.get(f"{cluster.nodes[0].url}/admin/audit/verify", headers=auditor, timeout=60)
    assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text

    # Restarted, the node takes its share again.
    cluster.start(victim)
    with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        nodes = {
            client.post(cluster.mcp("up"), json=tool_call("echo", {"text": "back"}), headers=headers).headers[
                "x-node"
            ]
            for _ in range(6)
        }
    assert f"127.0.0.1:{victim.port}" in nodes
