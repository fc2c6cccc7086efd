"""What the bridge keeps per handshake-era client session (decision 0011): its log level, its
resource subscriptions, and its stream events for resumption; each reaches only that client."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError
from pydantic import TypeAdapter

from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery
from conformance.fixtures.launch import FIXTURES_DIR, free_port, start_process
from tests.support.audit import records_until
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import ACCEPT

LEGACY = "2025-11-25"
HEADERS = {"accept": ACCEPT, "mcp-protocol-version": LEGACY}
WATCHED = "test://watched-resource"
FORBIDDEN = "test://static-text"


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, legacy_upstream: str
) -> Iterator[RunningGateway]:
    port = free_port()
    args = [sys.executable, str(FIXTURES_DIR / "mcp_everything.py"), "--port", str(port)]
    with start_process(args, port) as process:
        config = {
            "allow_anonymous": True,
            "servers": [
                {"name": "every", "url": f"{process.url}/mcp"},
                {"name": "modern", "url": f"{modern_upstream}/mcp"},
                {"name": "legacy", "url": f"{legacy_upstream}/mcp"},
            ],
            "virtual_servers": [{"name": "plain", "resources": ["every/*"], "prefix": False}],
            "policy": {
                "rules": [
                    "p, anonymous, mcp:every/*, *, allow",
                    "p, anonymous, mcp:modern/*, *, allow",
                    "p, anonymous, mcp:legacy/*, *, allow",
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


# --- the SDK's client, handshake era ---


class Inbox:
    """The notifications one client received, by method, and a wait for the next of a kind."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._arrived = anyio.Event()

    async def handler(self, message: Any) -> None:
        root = getattr(message, "root", message)
        method = getattr(root, "method", None)
        if isinstance(method, str):
            params = getattr(root, "params", None)
            dumped = params.model_dump(mode="json", exclude_none=True) if params is not None else {}
            self.received.append((method, dumped))
            self._arrived.set()
            self._arrived = anyio.Event()

    def of(self, method: str) -> list[dict[str, Any]]:
        return [params for m, params in self.received if m == method]

    async def until(self, method: str, count: int = 1) -> list[dict[str, Any]]:
        with anyio.fail_after(10):
            while len(self.of(method)) < count:
                await self._arrived.wait()
        return self.of(method)


@asynccontextmanager
async def legacy(url: str) -> AsyncIterator[tuple[Client, Inbox]]:
    inbox = Inbox()
    async with Client(url, mode="legacy", message_handler=inbox.handler) as client:
        yield client, inbox


_REQUEST: TypeAdapter[Any] = TypeAdapter(types.ClientRequest)


async def request(client: Client, method: str, params: dict[str, Any]) -> None:
    """A request the SDK's client marks deprecated (removed in 2026-07-28), sent as it would send it."""
    typed = _REQUEST.validate_python({"method": method, "params": params})
    await client.session.send_request(typed, types.EmptyResult)


UPDATED = "notifications/resources/updated"


async def test_an_update_reaches_each_subscribed_client_with_its_uri_and_no_one_else(
    gateway: RunningGateway,
) -> None:
    async with (
        legacy(gateway.mcp()) as (merged, merged_inbox),
        legacy(gateway.mcp("plain")) as (plain, plain_inbox),
        legacy(gateway.mcp()) as (bystander, bystander_inbox),
    ):
        await request(merged, "resources/subscribe", {"uri": f"every+{WATCHED}"})
        await request(plain, "resources/subscribe", {"uri": WATCHED})
        await bystander.call_tool("every__test_trigger_resource_update", {})
        assert await merged_inbox.until(UPDATED) == [{"uri": f"every+{WATCHED}"}]
        assert await plain_inbox.until(UPDATED) == [{"uri": WATCHED}]

        await request(merged, "resources/unsubscribe", {"uri": f"every+{WATCHED}"})
        await bystander.call_tool("every__test_trigger_resource_update", {})
        assert len(await plain_inbox.until(UPDATED, 2)) == 2
        # Each session's stream is its own: by now any notice to the others would have come first.
        await merged.list_tools()
        assert len(merged_inbox.of(UPDATED)) == 1
        assert bystander_inbox.of(UPDATED) == []


async def test_a_subscription_ends_with_its_session_and_the_upstream_is_subscribed_again(
    gateway: RunningGateway,
) -> None:
    async with legacy(gateway.mcp()) as (first, _inbox):
        await request(first, "resources/subscribe", {"uri": f"every+{WATCHED}"})
    async with legacy(gateway.mcp()) as (second, inbox):
        await request(second, "resources/subscribe", {"uri": f"every+{WATCHED}"})
        await second.call_tool("every__test_trigger_resource_update", {})
        assert await inbox.until(UPDATED) == [{"uri": f"every+{WATCHED}"}]


async def test_a_handshake_era_upstream_is_subscribed_once_and_left_by_the_last_client(
    gateway: RunningGateway,
) -> None:
    uri = "fixture://hello"
    exposed = {"uri": f"legacy+{uri}"}

    async def subscribers(client: Client) -> str:
        # The upstream's count of sessions subscribed to `uri` (it tells each of them, too).
        result = await client.call_tool("legacy__touch", {"uri": uri})
        text: str = result.content[0].text  # type: ignore[union-attr]  # the fixture answers text
        return text

    async with legacy(gateway.mcp()) as (first, first_inbox), legacy(gateway.mcp()) as (second, second_inbox):
        await request(first, "resources/subscribe", exposed)
        await request(second, "resources/subscribe", exposed)
        assert await subscribers(first) == "1"
        assert await first_inbox.until(UPDATED) == [{"uri": f"legacy+{uri}"}]
        assert await second_inbox.until(UPDATED) == [{"uri": f"legacy+{uri}"}]

        await request(first, "resources/unsubscribe", exposed)
        assert await subscribers(first) == "1"
        await request(second, "resources/unsubscribe", exposed)
        assert await subscribers(first) == "0"


@pytest.mark.parametrize(
    ("method", "uri"),
    [
        ("resources/subscribe", WATCHED),  # no namespace on a prefixing endpoint
        ("resources/subscribe", f"nosuch+{WATCHED}"),  # no such server
        ("resources/subscribe", "every+" + "x" * 5000),  # longer than a URI may be
        ("resources/unsubscribe", f"every+{FORBIDDEN}"),  # never subscribed
    ],
)
async def test_a_subscription_change_that_names_nothing_is_refused(
    gateway: RunningGateway, method: str, uri: str
) -> None:
    async with legacy(gateway.mcp()) as (client, _inbox):
        await request(client, "resources/subscribe", {"uri": f"every+{WATCHED}"})
        with pytest.raises(MCPError) as refused:
            await request(client, method, {"uri": uri})
        # A URI no server of the endpoint serves is no resource policy grants (-32003).
        assert refused.value.error.code in (-32003, -32600, -32602), refused.value.error
        await request(client, "resources/unsubscribe", {"uri": f"every+{WATCHED}"})


async def test_a_subscription_the_policy_forbids_is_refused_and_audited(gateway: RunningGateway) -> None:
    async with legacy(gateway.mcp()) as (client, _inbox):
        await request(client, "resources/subscribe", {"uri": f"every+{WATCHED}"})
        with pytest.raises(MCPError) as refused:
            await request(client, "resources/subscribe", {"uri": f"every+{FORBIDDEN}"})
        assert refused.value.error.code == -32003, refused.value.error
    engine = make_engine(gateway.database_url)
    try:
        query = AuditQuery(resource=f"mcp:every/resource/{FORBIDDEN}", decision="denied")
        records = await records_until(engine, query, lambda records: len(records) >= 1)
        assert records[0]["action"] == "read"
    finally:
        engine.dispose()


# --- log levels ---

MESSAGE = "notifications/message"


# A 2026-07-28 upstream (asked per request) and a handshake-era one (each client session's own).
@pytest.mark.parametrize("tool", ["every__test_log_levels", "legacy__log_levels"])
async def test_each_client_gets_its_own_calls_log_messages_at_its_own_level(
    gateway: RunningGateway, tool: str
) -> None:
    async with (
        legacy(gateway.mcp()) as (verbose, verbose_inbox),
        legacy(gateway.mcp()) as (terse, terse_inbox),
    ):
        await request(verbose, "logging/setLevel", {"level": "info"})
        await request(terse, "logging/setLevel", {"level": "warning"})
        async with anyio.create_task_group() as calls:
            calls.start_soon(verbose.call_tool, tool, {"tag": "verbose"})
            calls.start_soon(terse.call_tool, tool, {"tag": "terse"})

        # Related to the call, so they came on its stream, before its answer.
        assert [m["data"] for m in verbose_inbox.of(MESSAGE)] == [
            "verbose info",
            "verbose warning",
            "verbose error",
        ]
        assert [m["data"] for m in terse_inbox.of(MESSAGE)] == ["terse warning", "terse error"]


async def test_a_client_that_set_no_level_gets_no_log_messages(gateway: RunningGateway) -> None:
    async with legacy(gateway.mcp()) as (client, inbox):
        await client.call_tool("every__test_log_levels", {"tag": "quiet"})
        await request(client, "logging/setLevel", {"level": "error"})
        await client.call_tool("every__test_log_levels", {"tag": "loud"})
    assert [m["data"] for m in inbox.of(MESSAGE)] == ["loud error"]


def test_an_unknown_level_is_refused(gateway: RunningGateway) -> None:
    url = gateway.mcp()
    headers = HEADERS | {"mcp-session-id": open_session(url)}

    def set_level(level: str) -> dict[str, Any]:
        answer = httpx.post(url, json=rpc(5, "logging/setLevel", {"level": level}), headers=headers)
        [event] = [e for e in events_of(answer.text.splitlines()) if e.get("data")]
        parsed: dict[str, Any] = json.loads(event["data"])
        return parsed

    assert set_level("notice")["result"] == {}
    assert set_level("loud")["error"]["code"] == -32602


async def test_a_2026_client_gets_its_calls_log_messages_at_the_level_of_each_request(
    gateway: RunningGateway,
) -> None:
    received: dict[str, list[Any]] = {"warning": [], "none": []}

    def collect(into: list[Any]) -> Any:
        async def callback(params: types.LoggingMessageNotificationParams) -> None:
            into.append(params.data)

        return callback

    async with (
        Client(
            gateway.mcp(),
            mode="2026-07-28",
            log_level="warning",
            logging_callback=collect(received["warning"]),
        ) as asking,
        Client(gateway.mcp(), mode="2026-07-28", logging_callback=collect(received["none"])) as silent,
    ):
        await asking.call_tool("every__test_log_levels", {"tag": "asking"})
        await silent.call_tool("every__test_log_levels", {"tag": "silent"})
    assert received == {"warning": ["asking warning", "asking error"], "none": []}


async def test_an_http_sse_client_has_its_own_level_and_subscriptions_too(gateway: RunningGateway) -> None:
    inbox = Inbox()
    async with (
        sse_client(f"{gateway.url}/mcp/_sse") as (read, write),
        ClientSession(read, write, message_handler=inbox.handler) as session,
    ):
        await session.initialize()
        await session.send_request(
            _REQUEST.validate_python({"method": "logging/setLevel", "params": {"level": "error"}}),
            types.EmptyResult,
        )
        subscribe = {"method": "resources/subscribe", "params": {"uri": f"every+{WATCHED}"}}
        await session.send_request(_REQUEST.validate_python(subscribe), types.EmptyResult)
        await session.call_tool("every__test_log_levels", {"tag": "sse"})
        await session.call_tool("every__test_trigger_resource_update", {})
        assert await inbox.until(UPDATED) == [{"uri": f"every+{WATCHED}"}]
        assert [m["data"] for m in inbox.of(MESSAGE)] == ["sse error"]
