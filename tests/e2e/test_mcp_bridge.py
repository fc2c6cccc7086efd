"""The official MCP SDK client through the bridged endpoints: `/mcp` (merged), a virtual server, and
`/mcp/{server}` for stdio and legacy-SSE upstreams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conformance.fixtures.launch import stdio_command
from tests.support.gateway import RunningGateway, run_gateway

MODES = ["legacy", "2026-07-28", "auto"]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, legacy_upstream: str, sse_upstream: str
) -> Iterator[RunningGateway]:
    command, args = stdio_command()
    config = {
        "allow_anonymous": True,
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {"name": "legacy", "url": f"{legacy_upstream}/mcp"},
            {"name": "old-sse", "transport": "sse", "url": f"{sse_upstream}/sse"},
            {"name": "local", "transport": "stdio", "command": command, "args": args},
        ],
        "virtual_servers": [
            {"name": "mixed", "tools": ["modern/echo", "local/add", "legacy/sample"], "prefix": False},
            {"name": "prefixed", "tools": ["modern/*", "old-sse/echo"]},
        ],
        "policy": {
            "rules": [
                "p, anonymous, mcp:modern/echo, *, allow",
                "p, anonymous, mcp:modern/add, *, allow",
                "p, anonymous, mcp:modern/prompt/*, *, allow",
                "p, anonymous, mcp:modern/resource/*, *, allow",
                "p, anonymous, mcp:legacy/echo, *, allow",
                "p, anonymous, mcp:legacy/sample, *, allow",
                "p, anonymous, mcp:legacy/elicit, *, allow",
                "p, anonymous, mcp:modern/ask_user, *, allow",
                "p, anonymous, mcp:old-sse/*, *, allow",
                "p, anonymous, mcp:local/*, *, allow",
                "p, anonymous, mcp:local/crash, *, deny",
            ]
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def text(result: Any) -> str:
    assert not result.is_error, result
    value: str = result.content[0].text
    return value


@pytest.mark.parametrize("mode", MODES)
async def test_the_merged_catalog_prefixes_names_and_shows_only_what_policy_allows(
    gateway: RunningGateway, mode: str
) -> None:
    async with Client(gateway.mcp(), mode=mode) as client:  # type: ignore[arg-type]
        names = sorted(t.name for t in (await client.list_tools()).tools)
        assert names == [
            "legacy__echo",
            "legacy__elicit",
            "legacy__sample",
            "local__add",
            "local__echo",
            "modern__add",
            "modern__ask_user",
            "modern__echo",
            "old-sse__add",
            "old-sse__echo",
        ]
        assert text(await client.call_tool("modern__echo", {"text": "m"})) == "m"
        assert text(await client.call_tool("legacy__echo", {"text": "l"})) == "l"
        assert text(await client.call_tool("old-sse__echo", {"text": "s"})) == "s"
        assert text(await client.call_tool("local__add", {"a": 2, "b": 3})) == "5"


async def test_merged_prompts_and_resources_are_namespaced_and_readable(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        prompts = [p.name for p in (await client.list_prompts()).prompts]
        assert prompts == ["modern__greet"]
        prompt = await client.get_prompt("modern__greet", {"name": "Ada"})
        assert "Ada" in str(prompt.messages[0].content)
        uris = [str(r.uri) for r in (await client.list_resources()).resources]
        assert uris == ["modern+fixture://hello"]
        read = await client.read_resource("modern+fixture://hello")
        assert read.contents[0].text == "hello"  # type: ignore[union-attr]
        # The contents name the URI the client asked for, which it can read again through /mcp.
        assert [str(c.uri) for c in read.contents] == ["modern+fixture://hello"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_virtual_server_serves_its_selection_unprefixed(gateway: RunningGateway, mode: str) -> None:
    async with Client(gateway.mcp("mixed"), mode=mode) as client:  # type: ignore[arg-type]
        assert sorted(t.name for t in (await client.list_tools()).tools) == ["add", "echo", "sample"]
        assert text(await client.call_tool("echo", {"text": "v"})) == "v"
        assert text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"


async def test_a_prefixed_virtual_server_hides_what_it_does_not_select(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp("prefixed"), mode="2026-07-28") as client:
        assert sorted(t.name for t in (await client.list_tools()).tools) == [
            "modern__add",
            "modern__ask_user",
            "modern__echo",
            "old-sse__echo",
        ]
        # Not selected: judged as an object of the virtual server, which no rule grants.
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("old-sse__add", {"a": 1, "b": 1})


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_and_sse_upstreams_are_served_at_their_own_url(
    gateway: RunningGateway, mode: str
) -> None:
    for server in ("local", "old-sse"):
        async with Client(gateway.mcp(server), mode=mode) as client:  # type: ignore[arg-type]
            assert "echo" in [t.name for t in (await client.list_tools()).tools]
            assert text(await client.call_tool("echo", {"text": server})) == server


async def test_denied_and_unknown_tools_are_refused_before_any_upstream(
    gateway: RunningGateway, modern_upstream: str
) -> None:
    httpx.post(f"{modern_upstream}/_fixture/reset")
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        for name in ("modern__whoami", "local__crash", "nosuch__tool", "modern__", "__echo", "modern__echo*"):
            with pytest.raises(MCPError, match="denied by policy"):
                await client.call_tool(name, {})
    calls = [
        r for r in httpx.get(f"{modern_upstream}/_fixture/received").json() if r["method"] == "tools/call"
    ]
    assert calls == []


async def test_a_stdio_upstream_that_exits_is_restarted(tmp_path: Path) -> None:
    command, args = stdio_command()
    config = {
        "allow_anonymous": True,
        "servers": [
            {"name": "local", "transport": "stdio", "command": command, "args": args, "timeout_s": 5}
        ],
        "policy": {"rules": ["p, anonymous, mcp:local/*, *, allow"]},
    }
    with run_gateway(tmp_path, config) as gw:
        async with Client(gw.mcp("local"), mode="2026-07-28") as client:
            assert text(await client.call_tool("echo", {"text": "before"})) == "before"
            with pytest.raises(MCPError):
                await client.call_tool("crash", {})
            # The supervisor restarts the child; the next call waits for it (bounded by the timeout).
            assert text(await client.call_tool("echo", {"text": "after"})) == "after"
        assert gw.output().count("fixture stdio ready") >= 2  # the child's stderr reaches the log


async def sampling(_ctx: Any, params: Any) -> Any:
    from mcp_types import CreateMessageResult, TextContent

    return CreateMessageResult(role="assistant", content=TextContent(type="text", text="sampled!"), model="m")


async def elicitation(_ctx: Any, params: Any) -> Any:
    from mcp_types import ElicitResult

    return ElicitResult(action="accept", content={"answer": "yes", "name": "Ada"})


@pytest.mark.parametrize("url", ["/mcp", "/mcp/mixed"])
async def test_sampling_from_a_legacy_upstream_reaches_the_calling_legacy_client(
    gateway: RunningGateway, url: str
) -> None:
    tool = "legacy__sample" if url == "/mcp" else "sample"
    async with Client(gateway.url + url, mode="legacy", sampling_callback=sampling) as client:
        assert "sampled!" in text(await client.call_tool(tool, {}))


async def test_elicitation_from_a_legacy_upstream_reaches_the_calling_legacy_client(
    gateway: RunningGateway,
) -> None:
    async with Client(gateway.mcp(), mode="legacy", elicitation_callback=elicitation) as client:
        assert "yes" in text(await client.call_tool("legacy__elicit", {}))


@pytest.mark.parametrize("mode", MODES)
async def test_an_input_required_result_is_answered_by_the_client_in_every_era(
    gateway: RunningGateway, mode: str
) -> None:
    # 2026-07-28 clients get input_required untouched and retry; legacy clients are asked the old way.
    async with Client(gateway.mcp(), mode=mode, elicitation_callback=elicitation) as client:  # type: ignore[arg-type]
        answer = text(await client.call_tool("modern__ask_user", {}))
    assert "Ada" in answer or "yes" in answer
