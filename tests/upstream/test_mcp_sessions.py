"""The bridge's supervised upstream sessions: the keepalive speaks each era's own probe, and an error
reply counts as a live server, so a healthy upstream is never torn down between requests."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from agentgw.registry.models import McpServerSpec
from agentgw.upstream import mcp_sessions
from agentgw.upstream.mcp_sessions import UpstreamSessions
from conformance.fixtures.launch import start_upstream


async def _probes(url: str) -> list[str | None]:
    async with httpx.AsyncClient() as http:
        received = (await http.get(f"{url}/_fixture/received")).json()
    return [r["method"] for r in received]


@pytest.mark.parametrize(("kind", "probe"), [("modern", "server/discover"), ("legacy", "ping")])
async def test_a_healthy_upstream_keeps_its_session_across_keepalives(
    kind: str, probe: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mcp_sessions, "KEEPALIVE_S", 0.2)
    caplog.set_level(logging.INFO, logger="agentgw.upstream.mcp_sessions")
    async with start_upstream(kind) as url:
        sessions = UpstreamSessions()
        sessions.sync([McpServerSpec(name="up", url=f"{url}/mcp")])
        try:
            async with asyncio.timeout(30):
                while True:
                    if (await _probes(url)).count(probe) >= 3:
                        break
                    await asyncio.sleep(0.1)  # polling another process: no event to wait on
        finally:
            await sessions.aclose()
    connects = [r for r in caplog.records if "connected (" in r.getMessage()]
    assert len(connects) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_unreachable_upstream_is_logged_as_such_not_as_a_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agentgw.upstream.mcp_sessions")
    sessions = UpstreamSessions()
    sessions.sync([McpServerSpec(name="gone", url="http://127.0.0.1:9/mcp")])
    try:
        async with asyncio.timeout(10):
            while True:
                if [r for r in caplog.records if r.levelno >= logging.WARNING]:
                    break
                await asyncio.sleep(0.05)  # log records come with no event to wait on
    finally:
        await sessions.aclose()
    message = next(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert message.startswith("upstream gone: cannot connect (")
    assert "ConnectError" in message and "retrying in" in message
