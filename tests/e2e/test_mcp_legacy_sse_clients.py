"""Clients of the 2024-11-05 HTTP+SSE transport (the official SDK's `sse_client`) through the gateway:
the merged catalog at `/mcp/_sse`, one server or virtual server at `/mcp/<name>/sse`. Every message
runs through the pipeline as on streamable HTTP; a session belongs to the principal that opened it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError
from mcp_types import CreateMessageResult, TextContent

from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery
from conformance.fixtures.launch import stdio_command
from tests.support.audit import records_until
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.tokens import bearer

MAX_BODY = 64 * 1024
POLICY = [
    "p, user:alice, mcp:modern/echo, *, allow",
    "p, user:alice, mcp:old-sse/*, *, allow",
    "p, user:bob, mcp:local/*, *, allow",
    "p, user:bob, mcp:modern/add, *, allow",
    "p, user:bob, mcp:local/crash, *, deny",
    "p, user:carol, mcp:legacy/sample, *, allow",
]
CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "modern__echo", "arguments": {}},
}


def config(modern_upstream: str, sse_upstream: str, legacy_upstream: str, **extra: Any) -> dict[str, Any]:
    command, args = stdio_command()
    return {
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {"name": "legacy", "url": f"{legacy_upstream}/mcp"},
            {"name": "old-sse", "transport": "sse", "url": f"{sse_upstream}/sse"},
            {"name": "local", "transport": "stdio", "command": command, "args": args},
        ],
        "virtual_servers": [{"name": "picked", "tools": ["modern/echo", "local/add"], "prefix": False}],
        "policy": {"rules": POLICY},
        "auth": {"builtin": {"enabled": True}},
        "max_body_bytes": MAX_BODY,
        # Without a run id, a legacy session is the run: over SSE, the SSE session.
        "budgets": {
            "rules": [{"name": "echo-per-run", "per": "run", "resource": "mcp:local/echo", "calls": 1}]
        },
        **extra,
    }


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, sse_upstream: str, legacy_upstream: str
) -> Iterator[RunningGateway]:
    settings = config(modern_upstream, sse_upstream, legacy_upstream)
    with run_gateway(tmp_path_factory.mktemp("gw"), settings) as gw:
        yield gw


def sse_url(gw: RunningGateway, endpoint: str) -> str:
    """The SSE URL of an endpoint (`/mcp` or `/mcp/<name>`)."""
    return f"{gw.url}/mcp/_sse" if endpoint == "/mcp" else f"{gw.url}{endpoint}/sse"


@asynccontextmanager
async def sse_session(
    gw: RunningGateway, endpoint: str, who: str, sessions: list[str] | None = None, **options: Any
) -> AsyncIterator[ClientSession]:
    """An initialized SDK session over HTTP+SSE as `who`, with a token for `endpoint`; the session's
    id is appended to `sessions`; `options` go to `ClientSession`."""
    async with (
        sse_client(
            sse_url(gw, endpoint),
            headers=bearer(gw, who, endpoint),
            on_session_created=(sessions if sessions is not None else []).append,
        ) as (read, write),
        ClientSession(read, write, **options) as session,
    ):
        await session.initialize()
        yield session


def text(result: Any) -> str:
    assert not result.is_error, result
    value: str = result.content[0].text
    return value


async def tool_names(session: ClientSession) -> list[str]:
    return sorted(t.name for t in (await session.list_tools()).tools)


async def test_the_merged_catalog_over_sse_shows_each_principal_what_policy_allows(
    gateway: RunningGateway,
) -> None:
    async with sse_session(gateway, "/mcp", "alice") as alice, sse_session(gateway, "/mcp", "bob") as bob:
        assert await tool_names(alice) == ["modern__echo", "old-sse__add", "old-sse__echo"]
        assert await tool_names(bob) == ["local__add", "local__echo", "modern__add"]
        assert text(await alice.call_tool("modern__echo", {"text": "via sse"})) == "via sse"
        assert text(await alice.call_tool("old-sse__add", {"a": 2, "b": 3})) == "5"
        assert text(await bob.call_tool("local__add", {"a": 4, "b": 5})) == "9"


@pytest.mark.parametrize(
    ("name", "who", "tools", "call"),
    [
        # A streamable-HTTP upstream, otherwise a pass-through: its SSE leg is bridged.
        ("modern", "alice", ["echo"], ("echo", {"text": "m"}, "m")),
        ("old-sse", "alice", ["add", "echo"], ("echo", {"text": "s"}, "s")),
        ("local", "bob", ["add", "echo"], ("add", {"a": 1, "b": 2}, "3")),
        ("picked", "bob", ["add"], ("add", {"a": 3, "b": 3}, "6")),
    ],
)
async def test_one_server_or_virtual_server_is_served_over_sse_at_its_own_url(
    gateway: RunningGateway, name: str, who: str, tools: list[str], call: tuple[str, dict[str, Any], str]
) -> None:
    async with sse_session(gateway, f"/mcp/{name}", who) as session:
        assert await tool_names(session) == tools
        tool, arguments, expected = call
        assert text(await session.call_tool(tool, arguments)) == expected


async def test_a_denied_call_over_sse_is_refused_before_the_upstream_and_audited(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    sessions: list[str] = []
    async with sse_session(gateway, "/mcp", "alice", sessions) as alice:
        with pytest.raises(MCPError, match="denied by policy"):
            await alice.call_tool("modern__add", {"a": 1, "b": 1})
    received = httpx.get(f"{modern_upstream}/_fixture/received").json()
    assert [r for r in received if r["method"] == "tools/call"] == []
    engine = make_engine(gateway.database_url)
    try:
        query = AuditQuery(subject="user:alice", resource="mcp:modern/add", decision="denied")
        [record] = await records_until(engine, query, lambda found: len(found) == 1)
    finally:
        engine.dispose()
    assert record["session_id"] == sessions[0]


async def sampling(_ctx: Any, _params: Any) -> Any:
    return CreateMessageResult(role="assistant", content=TextContent(type="text", text="sampled!"), model="m")


async def test_an_upstreams_sampling_request_reaches_the_calling_sse_client(gateway: RunningGateway) -> None:
    async with sse_session(gateway, "/mcp", "carol", sampling_callback=sampling) as carol:
        assert "sampled!" in text(await carol.call_tool("legacy__sample", {}))


async def test_budgets_hold_over_sse_with_the_session_as_the_run(gateway: RunningGateway) -> None:
    async with sse_session(gateway, "/mcp", "bob") as bob:
        assert text(await bob.call_tool("local__echo", {"text": "once"})) == "once"
        with pytest.raises(MCPError, match="budget 'echo-per-run' exhausted"):
            await bob.call_tool("local__echo", {"text": "twice"})
    async with sse_session(gateway, "/mcp", "bob") as bob:
        assert text(await bob.call_tool("local__echo", {"text": "a new run"})) == "a new run"


async def test_a_session_is_not_found_for_another_principal_another_endpoint_or_an_unknown_id(
    gateway: RunningGateway,
) -> None:
    sessions: list[str] = []
    async with sse_session(gateway, "/mcp", "alice", sessions) as alice:
        [session_id] = sessions
        attempts = [
            (f"/mcp/_messages?session_id={session_id}", bearer(gateway, "bob", "/mcp")),
            (f"/mcp/modern/messages?session_id={session_id}", bearer(gateway, "alice", "/mcp/modern")),
            (f"/mcp/_messages?session_id={'0' * 32}", bearer(gateway, "alice", "/mcp")),
        ]
        for path, auth in attempts:
            refused = httpx.post(f"{gateway.url}{path}", json=CALL, headers=auth)
            assert refused.status_code == 404, (path, refused.text)
            assert "session not found" in refused.json()["error"]["message"]
        # The owner's session is untouched.
        assert text(await alice.call_tool("modern__echo", {"text": "still mine"})) == "still mine"


async def test_a_session_header_on_an_sse_message_names_no_other_session(gateway: RunningGateway) -> None:
    # Unchecked on this transport, it must not pick another session's run (budgets, audit) or relay.
    sessions: list[str] = []
    async with sse_session(gateway, "/mcp", "alice", sessions):
        headers = bearer(gateway, "alice", "/mcp") | {
            "mcp-session-id": "someone-elses",
            "agent-run-id": "hdr",
        }
        accepted = httpx.post(
            f"{gateway.url}/mcp/_messages", params={"session_id": sessions[0]}, json=CALL, headers=headers
        )
        assert accepted.status_code == 202
        engine = make_engine(gateway.database_url)
        try:
            query = AuditQuery(subject="user:alice", run_id="hdr", event="decision")
            [record] = await records_until(engine, query, lambda found: len(found) == 1)
        finally:
            engine.dispose()
    assert record["session_id"] == sessions[0]


@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("GET", "/mcp/_sse", "/mcp"),
        ("POST", "/mcp/_messages?session_id=x", "/mcp"),
        ("GET", "/mcp/modern/sse", "/mcp/modern"),
        ("POST", "/mcp/nosuch/messages?session_id=x", "/mcp/nosuch"),
    ],
)
def test_without_credentials_each_leg_gets_its_endpoints_oauth_challenge(
    gateway: RunningGateway, method: str, path: str, endpoint: str
) -> None:
    answer = httpx.request(method, f"{gateway.url}{path}", json=CALL if method == "POST" else None)
    assert answer.status_code == 401
    metadata = f"{gateway.url}/.well-known/oauth-protected-resource{endpoint}"
    assert f'resource_metadata="{metadata}"' in answer.headers["www-authenticate"]


@pytest.mark.parametrize(("endpoint", "sse"), [("/mcp", "/mcp/_sse"), ("/mcp/local", "/mcp/local/sse")])
def test_an_sse_client_at_the_streamable_url_is_told_where_to_connect(
    gateway: RunningGateway, endpoint: str, sse: str
) -> None:
    headers = bearer(gateway, "bob", endpoint) | {"accept": "text/event-stream"}
    answer = httpx.get(f"{gateway.url}{endpoint}", headers=headers)
    assert answer.status_code == 400
    assert f"HTTP+SSE transport connect to {sse}" in answer.json()["error"]["message"]


def test_a_token_for_another_endpoint_is_refused_on_an_sse_leg(gateway: RunningGateway) -> None:
    answer = httpx.get(f"{gateway.url}/mcp/_sse", headers=bearer(gateway, "alice", "/mcp/modern"))
    assert answer.status_code == 401


async def test_bad_input_on_the_message_leg_gets_a_clear_error(gateway: RunningGateway) -> None:
    sessions: list[str] = []
    async with sse_session(gateway, "/mcp", "alice", sessions) as alice:
        url = f"{gateway.url}/mcp/_messages"
        auth = bearer(gateway, "alice", "/mcp")
        missing = httpx.post(url, json=CALL, headers=auth)
        assert missing.status_code == 400
        assert "session_id is required" in missing.json()["error"]["message"]
        own = {"session_id": sessions[0]}
        malformed = httpx.post(url, params=own, content=b"{not json", headers=auth | json_type())
        assert malformed.status_code == 400
        assert malformed.json()["error"]["code"] == -32700
        not_a_message = httpx.post(url, params=own, json=[CALL], headers=auth)
        assert not_a_message.status_code == 400
        assert "batches are not supported" in not_a_message.json()["error"]["message"]
        big = {**CALL, "params": {"name": "modern__echo", "arguments": {"text": "x" * MAX_BODY}}}
        oversized = httpx.post(url, params=own, json=big, headers=auth)
        assert oversized.status_code == 413
        assert "too large" in oversized.json()["error"]["message"]
        wrong_type = httpx.post(url, params=own, content=json.dumps(CALL), headers=auth)
        assert wrong_type.status_code == 415
        wrong_method = httpx.delete(f"{gateway.url}/mcp/_sse", headers=auth)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
        # None of it reached, or spoiled, the session.
        assert text(await alice.call_tool("modern__echo", {"text": "fine"})) == "fine"


def json_type() -> dict[str, str]:
    return {"content-type": "application/json"}


# --- caps and idle expiry: gateways of their own --------------------------------------------------


@dataclass
class RawStream:
    response: httpx.Response
    endpoint: str | None  # the message URL, if the GET opened a session
    lines: AsyncIterator[str]  # the rest of the stream


@asynccontextmanager
async def raw_stream(http: httpx.AsyncClient, gw: RunningGateway, who: str) -> AsyncIterator[RawStream]:
    """A GET of `/mcp/_sse` as `who`, read up to the endpoint event if it opened a session."""
    headers = bearer(gw, who, "/mcp") | {"accept": "text/event-stream"}
    async with http.stream("GET", f"{gw.url}/mcp/_sse", headers=headers) as response:
        lines = response.aiter_lines()
        endpoint = None
        if response.status_code == 200:
            async for line in lines:
                if line.startswith("data: "):
                    endpoint = line.removeprefix("data: ")
                    break
        yield RawStream(response, endpoint, lines)


async def test_sse_sessions_count_in_the_per_principal_cap_with_the_other_legacy_sessions(
    tmp_path: Path, modern_upstream: str, sse_upstream: str, legacy_upstream: str
) -> None:
    settings = config(modern_upstream, sse_upstream, legacy_upstream, max_sessions_per_principal=2)
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    legacy = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}
    with run_gateway(tmp_path, settings) as gw:
        async with httpx.AsyncClient(timeout=10) as http:
            opened = await http.post(gw.mcp(), json=initialize, headers=legacy | bearer(gw, "alice", "/mcp"))
            assert opened.status_code == 200
            async with raw_stream(http, gw, "alice") as first:
                assert first.response.status_code == 200 and first.endpoint is not None
                async with raw_stream(http, gw, "alice") as refused:
                    assert refused.response.status_code == 429
                    answer = json.loads(await refused.response.aread())
                    assert "too many open sessions" in answer["error"]["message"]
                async with raw_stream(http, gw, "bob") as other:
                    assert other.response.status_code == 200  # the cap is per principal
            # A closed stream frees its place (once the gateway has seen the client go).
            with anyio.fail_after(10):
                while True:
                    async with raw_stream(http, gw, "alice") as again:
                        if again.response.status_code == 200:
                            break
                    await anyio.sleep(0.05)  # another process notices the disconnect: no event to wait on


async def test_an_idle_sse_session_is_closed_and_its_id_forgotten(
    tmp_path: Path, modern_upstream: str, sse_upstream: str, legacy_upstream: str
) -> None:
    settings = config(modern_upstream, sse_upstream, legacy_upstream, session_idle_s=1)
    with run_gateway(tmp_path, settings) as gw:
        async with httpx.AsyncClient(timeout=10) as http, raw_stream(http, gw, "alice") as stream:
            assert stream.response.status_code == 200 and stream.endpoint is not None
            with anyio.fail_after(10):
                async for _ in stream.lines:
                    pass  # until the gateway ends the stream
            auth = bearer(gw, "alice", "/mcp")
            late = await http.post(f"{gw.url}{stream.endpoint}", json=CALL, headers=auth)
            assert late.status_code == 404


def test_a_server_whose_credential_is_per_caller_has_no_sse_leg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modern_upstream: str
) -> None:
    # The bridge's upstream sessions are shared: a caller's exchanged token must never ride one.
    monkeypatch.setenv("AGW_SSE_TEST_SECRET", "not-used")
    client = {"client_id": "agentgw", "secret": "client-secret"}
    settings = {
        "servers": [
            {
                "name": "payments",
                "url": f"{modern_upstream}/mcp",
                "credential": {"mode": "token_exchange", "client": client},
            }
        ],
        "secrets": {"client-secret": {"env": "AGW_SSE_TEST_SECRET"}},
        "policy": {"rules": ["p, user:alice, mcp:payments/*, *, allow"]},
        "auth": {"builtin": {"enabled": True}},
    }
    with run_gateway(tmp_path, settings) as gw:
        refused = httpx.get(f"{gw.url}/mcp/payments/sse", headers=bearer(gw, "alice", "/mcp/payments"))
    assert refused.status_code == 404
    assert "streamable HTTP only" in refused.json()["error"]["message"]


# --- with the session store in Redis ---------------------------------------------------------------

REDIS = "redis://127.0.0.1:6379/0"


async def test_with_redis_a_session_is_checked_on_every_node_and_its_own_checks_credentials_again(
    tmp_path: Path, modern_upstream: str, sse_upstream: str, legacy_upstream: str
) -> None:
    settings = config(modern_upstream, sse_upstream, legacy_upstream, redis_url=REDIS)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sessions: list[str] = []
    with run_gateway(tmp_path / "a", settings) as a, run_gateway(tmp_path / "b", settings) as b:
        async with sse_session(a, "/mcp", "alice", sessions) as alice:
            assert text(await alice.call_tool("modern__echo", {"text": "a"})) == "a"
            messages = f"/mcp/_messages?session_id={sessions[0]}"
            # Another principal, on the node that holds the session: refused by the binding.
            foreign = httpx.post(f"{a.url}{messages}", json=CALL, headers=bearer(a, "bob", "/mcp"))
            assert foreign.status_code == 404
            # The owner, on another node: forwarded to the node holding the stream, which checks the
            # credentials itself. These nodes have signing keys of their own, so a token only B
            # accepts is refused there, with A's own challenge.
            elsewhere = httpx.post(f"{b.url}{messages}", json=CALL, headers=bearer(b, "alice", "/mcp"))
            assert elsewhere.status_code == 401, elsewhere.text
            assert "resource_metadata" in elsewhere.headers["www-authenticate"]
            assert text(await alice.call_tool("modern__echo", {"text": "still"})) == "still"


def test_an_unreachable_session_store_refuses_to_open_a_session(
    tmp_path: Path, modern_upstream: str, sse_upstream: str, legacy_upstream: str
) -> None:
    settings = config(modern_upstream, sse_upstream, legacy_upstream, redis_url="redis://127.0.0.1:1/0")
    with run_gateway(tmp_path, settings) as gw:
        refused = httpx.get(f"{gw.url}/mcp/_sse", headers=bearer(gw, "alice", "/mcp"), timeout=10)
    assert refused.status_code == 503
    assert "session store is unreachable" in refused.json()["error"]["message"]
