"""A running gateway picks up a policy file edit on the next call, and refuses a broken one while the
last good policy keeps working; the admin API edits database rules that take effect at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from tests.e2e.test_auth_mcp import sdk_client
from tests.support.gateway import RunningGateway, run_gateway

GOOD = "p, user:alice, mcp:modern/echo, *, allow\np, user:sec, admin:policies, *, allow\n"


def edit(path: Path, text: str) -> None:
    # A distinct mtime even when two edits land within one clock tick.
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def gateway(tmp_path: Path, modern_upstream: str) -> Iterator[tuple[RunningGateway, Path]]:
    policy = tmp_path / "policy.csv"
    policy.write_text(GOOD)
    config: dict[str, Any] = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"file": str(policy), "database": True},
    }
    with run_gateway(tmp_path, config) as gw:
        yield gw, policy


def token(gw: RunningGateway, subject: str, audience: str) -> str:
    keys = SigningKeys(gw.signing_keys)
    return mint_token(keys, gw.url, subject=subject, audience=audience)[0]


async def tools(gw: RunningGateway, bearer: str) -> set[str]:
    async with sdk_client(gw.mcp("modern"), bearer) as client:
        return {t.name for t in (await client.list_tools()).tools}


async def test_a_policy_file_edit_takes_effect_on_the_next_call_and_a_broken_one_is_refused(
    gateway: tuple[RunningGateway, Path],
) -> None:
    gw, policy = gateway
    alice = token(gw, "alice", f"{gw.url}/mcp/modern")
    assert await tools(gw, alice) == {"echo"}
    edit(policy, GOOD + "p, user:alice, mcp:modern/add, *, allow\n")
    assert await tools(gw, alice) == {"echo", "add"}
    async with sdk_client(gw.mcp("modern"), alice) as client:
        assert (await client.call_tool("add", {"a": 2, "b": 3})).content[0].text == "5"  # type: ignore[union-attr]
    edit(policy, "p, user:alice, mcp:modern/*, call, perhaps\n")  # broken: refused, old policy stays
    assert await tools(gw, alice) == {"echo", "add"}
    async with sdk_client(gw.mcp("modern"), alice) as client:
        with pytest.raises(MCPError, match="denied by policy"):
            await client.call_tool("whoami", {})
    assert "policy reload refused" in gw.output()
    admin = {"authorization": f"Bearer {token(gw, 'sec', f'{gw.url}/admin')}"}
    state = httpx.get(f"{gw.url}/admin/policies", headers=admin).json()
    assert "perhaps" in state["last_error"]
    edit(policy, GOOD)  # repaired: the next call sees the repaired file
    assert await tools(gw, alice) == {"echo"}


async def test_rules_added_through_the_admin_api_apply_at_once_and_can_be_removed(
    gateway: tuple[RunningGateway, Path],
) -> None:
    gw, _ = gateway
    alice = token(gw, "alice", f"{gw.url}/mcp/modern")
    admin = {"authorization": f"Bearer {token(gw, 'sec', f'{gw.url}/admin')}"}
    rule = {"rule": "p, user:alice, mcp:modern/whoami, list"}
    assert httpx.post(f"{gw.url}/admin/policies/rules", json=rule, headers=admin).status_code == 201
    assert await tools(gw, alice) == {"echo", "whoami"}
    assert (
        httpx.post(f"{gw.url}/admin/policies/rules", json={"rule": "p, broken"}, headers=admin).status_code
        == 409
    )
    check = {"subject": "user:alice", "object": "mcp:modern/whoami", "action": "list"}
    answer = httpx.post(f"{gw.url}/admin/policies/check", json=check, headers=admin).json()
    assert answer == {"allowed": True, "rule": "p, user:alice, mcp:modern/whoami, list, allow"}
    assert httpx.post(f"{gw.url}/admin/policies/rules/delete", json=rule, headers=admin).status_code == 204
    assert await tools(gw, alice) == {"echo"}
    alice_admin = {"authorization": f"Bearer {token(gw, 'alice', f'{gw.url}/admin')}"}
    assert httpx.post(f"{gw.url}/admin/policies/rules", json=rule, headers=alice_admin).status_code == 403
