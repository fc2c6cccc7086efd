"""Upstream list changes reach the clients of the bridged endpoints, in both eras."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from tests.support.gateway import RunningGateway, run_gateway


@pytest.fixture
def gateway(tmp_path_factory: pytest.TempPathFactory, legacy_upstream: str) -> Iterator[RunningGateway]:
    httpx.post(f"{legacy_upstream}/_fixture/reset")
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "legacy", "url": f"{legacy_upstream}/mcp"}],
        "policy": {"rules": ["p, anonymous, mcp:legacy/*, *, allow"]},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw
    httpx.post(f"{legacy_upstream}/_fixture/reset")  # late_tool must not leak into other tests


async def test_a_changed_upstream_list_is_announced_to_both_eras_and_refetched(
    gateway: RunningGateway,
) -> None:
    legacy_notice = anyio.Event()

    async def on_message(message: Any) -> None:
        if getattr(getattr(message, "root", message), "method", "") == "notifications/tools/list_changed":
            legacy_notice.set()

    async with (
        Client(gateway.mcp(), mode="2026-07-28") as modern,
        Client(gateway.mcp(), mode="legacy", message_handler=on_message) as legacy,
    ):
        before = {t.name for t in (await modern.list_tools()).tools}
        assert "legacy__late_tool" not in before
        await legacy.list_tools()  # the legacy session is now known to the gateway
        async with modern.listen(tools_list_changed=True) as subscription:
            await legacy.call_tool("legacy__notify_change", {})
            with anyio.fail_after(10):
                async for _event in subscription:
                    break
        with anyio.fail_after(10):
            await legacy_notice.wait()
        after = {t.name for t in (await modern.list_tools(cache_mode="refresh")).tools}
        assert "legacy__late_tool" in after
