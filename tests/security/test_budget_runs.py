"""A run id is no secret (the README's tour uses `run-42`): another principal who knows it must not be
able to spend someone else's run budget. Runs are counted per principal unless a rule shares them.

A real gateway process with the built-in issuer; alice and bob call through the official MCP SDK
client with their own tokens and the same `Agent-Run-Id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from agentgw.oauth.server import hash_password
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import MODERN
from tests.support.tokens import bearer

LIMIT = 3


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": ["p, user:alice, mcp:modern/*, *, allow", "p, user:bob, mcp:modern/*, *, allow"]},
        "auth": {
            "builtin": {
                "users": [
                    {"name": "alice", "password_hash": hash_password("wonderland")},
                    {"name": "bob", "password_hash": hash_password("builder")},
                ]
            }
        },
        "budgets": {
            "rules": [
                {"name": "run-calls", "per": "run", "match": "run-*", "calls": LIMIT},
                {"name": "team-run", "per": "run", "match": "team-*", "shared_run": True, "calls": LIMIT},
            ]
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


async def calls_until_refused(gw: RunningGateway, subject: str, run: str, most: int) -> int:
    """How many echo calls `subject` makes in `run` before the budget refuses one (at most `most`)."""
    headers = {**bearer(gw, subject, "/mcp/modern"), "Agent-Run-Id": run}
    async with (
        httpx.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(gw.mcp("modern"), http_client=http), mode=MODERN) as client,
    ):
        for made in range(most):
            try:
                result = await client.call_tool("echo", {"text": f"{subject} {made}"})
            except MCPError as refused:
                assert refused.code == -32029, refused.message
                return made
            assert not result.is_error
    return most


async def test_bob_cannot_exhaust_alices_run(gateway: RunningGateway) -> None:
    run = f"run-42-{uuid.uuid4().hex[:8]}"
    assert await calls_until_refused(gateway, "bob", run, LIMIT + 2) == LIMIT
    assert await calls_until_refused(gateway, "alice", run, LIMIT + 2) == LIMIT


async def test_a_rule_that_shares_its_runs_counts_every_principal_in_them_together(
    gateway: RunningGateway,
) -> None:
    run = f"team-{uuid.uuid4().hex[:8]}"
    assert await calls_until_refused(gateway, "bob", run, 2) == 2
    assert await calls_until_refused(gateway, "alice", run, LIMIT + 2) == LIMIT - 2
