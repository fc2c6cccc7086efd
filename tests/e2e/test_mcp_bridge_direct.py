"""Bridged calls to a 2026-07-28 streamable-HTTP upstream travel as plain POSTs (not through the SDK's
client session): progress, upstream errors and the gateway's own credential still behave."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conformance.fixtures import mcp_protected_upstream
from conformance.fixtures.launch import free_port, start_process
from tests.support.gateway import RunningGateway, gateway_args, write_config

MODES = ["legacy", "2026-07-28"]
STATIC_KEY = "static-bridge-key-5d1e"


@pytest.fixture(scope="module")
def vault() -> Iterator[str]:
    """A protected upstream that takes exactly one static key; `/_fixture/reject` makes it refuse it."""
    port = free_port()
    with start_process(mcp_protected_upstream.command(port, static_key=STATIC_KEY), port) as process:
        yield process.url


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, vault: str
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gw")
    config = {
        "allow_anonymous": True,
        "servers": [
            {"name": "modern", "url": f"{modern_upstream}/mcp"},
            {
                "name": "vault",
                "url": f"{vault}/mcp",
                "credential": {"mode": "static", "secret": "vault-key"},
            },
        ],
        "secrets": {"vault-key": {"env": "AGW_BRIDGE_KEY"}},
        "policy": {"rules": ["p, anonymous, mcp:modern/*, *, allow", "p, anonymous, mcp:vault/*, *, allow"]},
    }
    config_path = write_config(tmp, config)
    database_url = f"sqlite:///{tmp / 'agentgw.db'}"
    port = free_port()
    args = gateway_args(config_path, port, database_url)
    with start_process(args, port, env={"AGW_BRIDGE_KEY": STATIC_KEY}) as process:
        yield RunningGateway(process, config_path, database_url)


@pytest.mark.parametrize("mode", MODES)
async def test_progress_of_a_modern_upstream_reaches_the_calling_client(
    gateway: RunningGateway, mode: str
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(gateway.mcp(), mode=mode) as client:  # type: ignore[arg-type]
        result = await client.call_tool("modern__progress", {}, progress_callback=on_progress)
    assert result.content[0].text == "progress done"  # type: ignore[union-attr]
    assert seen == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]


async def test_an_upstream_error_keeps_its_code_and_message(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        with pytest.raises(MCPError) as raised:
            await client.read_resource("modern+fixture://nope")
    assert raised.value.error.code == -32602
    assert raised.value.error.message == "Unknown resource: fixture://nope"


def received(vault: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{vault}/_fixture/received").json()
    return [r for r in records if r["http_method"] == "POST"]


async def test_a_refused_credential_is_sent_again_once_then_the_call_fails_clearly(
    gateway: RunningGateway, vault: str
) -> None:
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        httpx.post(f"{vault}/_fixture/reset").raise_for_status()
        httpx.post(f"{vault}/_fixture/reject", json={"count": 1}).raise_for_status()
        paid = await client.call_tool("vault__pay", {"amount": 3})
        retried = received(vault)[-2:]
        httpx.post(f"{vault}/_fixture/reject", json={"count": 2}).raise_for_status()
        with pytest.raises(MCPError, match="refused the gateway's credential"):
            await client.call_tool("vault__pay", {"amount": 4})
    assert paid.content[0].text == "paid 3"  # type: ignore[union-attr]
    # The static credential has nothing fresher to offer: the same key, once more, then a clear error.
    assert [(r["status"], r["authorization"]) for r in retried] == [
        (401, f"Bearer {STATIC_KEY}"),
        (200, f"Bearer {STATIC_KEY}"),
    ]
