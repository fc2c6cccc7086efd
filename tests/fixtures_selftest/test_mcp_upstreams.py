"""The fixture upstreams answer the official SDK client in each era and transport, and record requests."""

import json
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client, MCPError, StdioServerParameters, stdio_client
from mcp.client.session import ClientRequestContext, IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import (
    CallToolResult,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    ListRootsResult,
    PromptReference,
    Root,
    TextContent,
    ToolListChangedNotification,
)

from conformance.fixtures.launch import (
    FixtureStartError,
    start_process,
    start_upstream,
    start_upstream_sync,
    stdio_command,
)


@pytest.fixture(scope="session")
def modern_url() -> Iterator[str]:
    with start_upstream_sync("modern") as url:
        yield url


@pytest.fixture(scope="session")
def legacy_url() -> Iterator[str]:
    with start_upstream_sync("legacy") as url:
        yield url


@pytest.fixture(scope="session")
def sse_url() -> Iterator[str]:
    with start_upstream_sync("sse") as url:
        yield url


async def received(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        records: list[dict[str, Any]] = (await http.get(f"{url}/_fixture/received")).json()
    return records


async def reset(url: str) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{url}/_fixture/reset")).status_code == 204


async def tool_calls(url: str, name: str) -> list[dict[str, Any]]:
    return [r for r in await received(url) if r["method"] == "tools/call" and r["name"] == name]


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def answer_ada(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="accept", content={"answer": "Ada"})


# --- modern ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_modern_echo_add_and_record(modern_url: str) -> None:
    await reset(modern_url)
    async with Client(streamable_http_client(f"{modern_url}/mcp"), mode="2026-07-28") as client:
        assert client.protocol_version == "2026-07-28"
        assert text(await client.call_tool("echo", {"text": "hi"})) == "hi"
        added = await client.call_tool("add", {"a": 2, "b": 3})
        assert text(added) == "5"
        assert added.structured_content == {"result": 5}
    [call] = await tool_calls(modern_url, "echo")
    assert call["session_id"] is None
    assert call["protocol_version"] == "2026-07-28"
    assert call["authorization"] is None


@pytest.mark.asyncio
async def test_modern_whoami_sees_the_authorization_header(modern_url: str) -> None:
    await reset(modern_url)
    http_client = create_mcp_http_client(headers={"Authorization": "Bearer upstream-token"})
    async with (
        http_client,
        Client(
            streamable_http_client(f"{modern_url}/mcp", http_client=http_client), mode="2026-07-28"
        ) as client,
    ):
        assert text(await client.call_tool("whoami", {})) == "Bearer upstream-token"
    async with Client(streamable_http_client(f"{modern_url}/mcp"), mode="2026-07-28") as client:
        assert text(await client.call_tool("whoami", {})) == "none"
    assert [c["authorization"] for c in await tool_calls(modern_url, "whoami")] == [
        "Bearer upstream-token",
        None,
    ]


@pytest.mark.asyncio
async def test_modern_ask_user_is_an_input_required_round_trip(modern_url: str) -> None:
    await reset(modern_url)
    async with Client(
        streamable_http_client(f"{modern_url}/mcp"), mode="2026-07-28", elicitation_callback=answer_ada
    ) as client:
        assert text(await client.call_tool("ask_user", {"question": "Name?"})) == "Ada"
        first = await client.session.call_tool("ask_user", {"question": "Name?"}, allow_input_required=True)
        assert first.result_type == "input_required"
    # Driven call: first round + retry; manual call: first round only.
    assert len(await tool_calls(modern_url, "ask_user")) == 3


@pytest.mark.asyncio
async def test_modern_progress_slow_prompt_resources_completion(modern_url: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(streamable_http_client(f"{modern_url}/mcp"), mode="2026-07-28") as client:
        assert text(await client.call_tool("progress", {}, progress_callback=on_progress)) == "progress done"
        assert [p for p, _, _ in seen] == [1, 2, 3]
        assert text(await client.call_tool("slow", {"seconds": 0.05})) == "done"
        prompt = await client.get_prompt("greet", {"name": "Ada"})
        assert isinstance(prompt.messages[0].content, TextContent)
        assert prompt.messages[0].content.text == "Hello, Ada!"
        hello = await client.read_resource("fixture://hello")
        assert [getattr(c, "text", None) for c in hello.contents] == ["hello"]
        listed = await client.list_resource_templates()
        assert [t.uri_template for t in listed.resource_templates] == ["fixture://items/{id}"]
        item = await client.read_resource("fixture://items/7")
        assert [getattr(c, "text", None) for c in item.contents] == ["item 7"]
        completion = await client.complete(
            PromptReference(type="ref/prompt", name="greet"), {"name": "name", "value": "a"}
        )
        assert completion.completion.values == ["alice"]
    assert any(
        r["method"] == "resources/read" and r["uri"] == "fixture://items/7"
        for r in await received(modern_url)
    )


# --- legacy ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_legacy_echo_has_a_session(legacy_url: str) -> None:
    await reset(legacy_url)
    async with Client(streamable_http_client(f"{legacy_url}/mcp"), mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        assert text(await client.call_tool("echo", {"text": "old"})) == "old"
        assert client.server_capabilities.tools is not None
        assert client.server_capabilities.tools.list_changed
    [call] = await tool_calls(legacy_url, "echo")
    assert call["session_id"]
    assert call["protocol_version"] == "2025-11-25"


@pytest.mark.asyncio
async def test_legacy_sample_elicit_roots_send_server_requests(legacy_url: str) -> None:
    sampled: list[CreateMessageRequestParams] = []

    async def model(context: ClientRequestContext, params: CreateMessageRequestParams) -> CreateMessageResult:
        sampled.append(params)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="sampled!"), model="m"
        )

    async def list_roots(context: ClientRequestContext) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri="file:///work/a"), Root(uri="file:///work/b")])

    async with Client(
        streamable_http_client(f"{legacy_url}/mcp"),
        mode="legacy",
        sampling_callback=model,
        elicitation_callback=answer_ada,
        list_roots_callback=list_roots,
    ) as client:
        assert text(await client.call_tool("sample", {"prompt": "hi"})) == "sampled!"
        assert json.loads(text(await client.call_tool("elicit", {}))) == {"answer": "Ada"}
        assert text(await client.call_tool("roots", {})).splitlines() == ["file:///work/a", "file:///work/b"]
    [request] = sampled
    assert isinstance(request.messages[0].content, TextContent)
    assert request.messages[0].content.text == "hi"


@pytest.mark.asyncio
@pytest.mark.parametrize("via", ["request", "standalone"])
async def test_legacy_notify_change_adds_late_tool(legacy_url: str, via: str) -> None:
    changed = anyio.Event()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.set()

    await reset(legacy_url)
    async with Client(
        streamable_http_client(f"{legacy_url}/mcp"), mode="legacy", message_handler=on_message
    ) as client:
        assert "late_tool" not in {t.name for t in (await client.list_tools()).tools}
        await client.call_tool("notify_change", {"via": via})
        with anyio.fail_after(5):
            await changed.wait()
        assert "late_tool" in {t.name for t in (await client.list_tools(cache_mode="bypass")).tools}
        assert text(await client.call_tool("late_tool", {})) == "late"
    await reset(legacy_url)
    async with Client(streamable_http_client(f"{legacy_url}/mcp"), mode="legacy") as client:
        assert "late_tool" not in {t.name for t in (await client.list_tools()).tools}


@pytest.mark.asyncio
async def test_legacy_refuses_the_modern_era(legacy_url: str) -> None:
    async with Client(streamable_http_client(f"{legacy_url}/mcp"), mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="Unsupported protocol version"):
            await client.call_tool("echo", {"text": "x"})
    async with Client(streamable_http_client(f"{legacy_url}/mcp"), mode="auto") as client:
        assert client.protocol_version == "2025-11-25"
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{legacy_url}/mcp",
            headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"},
            json={"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}},
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == -32600


# --- sse and stdio --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sse_echo_and_record(sse_url: str) -> None:
    await reset(sse_url)
    async with Client(
        sse_client(f"{sse_url}/sse", headers={"Authorization": "Bearer sse"}), mode="legacy"
    ) as client:
        assert text(await client.call_tool("echo", {"text": "sse"})) == "sse"
        assert text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"
    [call] = await tool_calls(sse_url, "echo")
    assert call["path"].startswith("/messages/")
    assert call["authorization"] == "Bearer sse"


@pytest.mark.asyncio
async def test_stdio_echo() -> None:
    command, args = stdio_command()
    async with Client(
        stdio_client(StdioServerParameters(command=command, args=args, cwd="/")), mode="legacy"
    ) as client:
        assert text(await client.call_tool("echo", {"text": "pipe"})) == "pipe"
        assert text(await client.call_tool("add", {"a": 4, "b": 5})) == "9"


def jsonrpc_line(message: dict[str, Any]) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode()


@pytest.mark.asyncio
async def test_stdio_logs_ready_and_crash_exits_3() -> None:
    command, args = stdio_command()
    client_info = {"name": "t", "version": "0"}
    init_params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client_info}
    async with await anyio.open_process([command, *args]) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        with anyio.fail_after(30):
            await process.stdin.send(jsonrpc_line({"id": 1, "method": "initialize", "params": init_params}))
            initialized = json.loads(
                await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1 << 20)
            )
            await process.stdin.send(jsonrpc_line({"method": "notifications/initialized"}))
            crash_params = {"name": "crash", "arguments": {}}
            await process.stdin.send(jsonrpc_line({"id": 2, "method": "tools/call", "params": crash_params}))
            assert await process.wait() == 3
            stderr = b"".join([chunk async for chunk in process.stderr]).decode()
    assert initialized["result"]["serverInfo"]["name"] == "fixture-stdio"
    assert stderr.splitlines()[0] == "fixture stdio ready"


# --- launch ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_start_upstream_stops_the_process() -> None:
    async with start_upstream("sse") as url:
        assert await received(url) == []
    with pytest.raises(httpx.ConnectError):
        await received(url)


def test_start_error_carries_the_stderr() -> None:
    with pytest.raises(FixtureStartError, match="invalid choice"), start_upstream_sync("nonsense"):
        pass
    with (
        pytest.raises(FixtureStartError, match="boom"),
        start_process([sys.executable, "-c", "raise SystemExit('boom')"], 1),
    ):
        pass
