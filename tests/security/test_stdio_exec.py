"""`admin:registry` is not command execution: a stdio server registered over HTTP needs the `admin:exec`
grant and a command line the config file allows, and sets no environment of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from conformance.fixtures.launch import stdio_command
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import META, answer_of, modern_headers

POLICY = [
    "p, role:operator, admin:registry, *, allow",
    "p, role:runner, admin:exec, write, allow",
    "p, user:alice, mcp:*, *, allow",
]


@dataclass
class Setup:
    gateway: RunningGateway
    marker: Path

    def headers(self, *roles: str) -> dict[str, str]:
        keys = SigningKeys(self.gateway.signing_keys)
        token, _ = mint_token(
            keys, self.gateway.url, subject="mallory", audience=f"{self.gateway.url}/admin", roles=roles
        )
        return {"authorization": f"Bearer {token}"}

    def register(self, spec: dict[str, Any], *roles: str) -> httpx.Response:
        return httpx.post(
            f"{self.gateway.url}/admin/registry/servers", json=spec, headers=self.headers(*roles)
        )

    def stored(self) -> list[str]:
        listing = httpx.get(f"{self.gateway.url}/admin/registry/servers", headers=self.headers("operator"))
        return [s["name"] for s in listing.json()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("exec")
    command, args = stdio_command()
    config = {"policy": {"rules": POLICY}, "stdio_allowed_commands": [[command, *args]]}
    with run_gateway(tmp, config) as gateway:
        yield Setup(gateway, tmp / "pwned")


def test_an_operator_cannot_run_a_command_by_registering_a_stdio_server(setup: Setup) -> None:
    attack = {
        "name": "shell",
        "transport": "stdio",
        "command": "/bin/sh",
        "args": ["-c", f"touch {setup.marker}"],
    }
    refused = setup.register(attack, "operator")
    assert refused.status_code == 403, refused.text
    assert "admin:exec" in refused.text
    assert setup.stored() == [] and not setup.marker.exists()


def test_the_exec_grant_runs_only_allow_listed_command_lines_without_an_environment(setup: Setup) -> None:
    command, args = stdio_command()
    shell = {
        "name": "shell",
        "transport": "stdio",
        "command": "/bin/sh",
        "args": ["-c", f"touch {setup.marker}"],
    }
    refused = setup.register(shell, "operator", "runner")
    assert refused.status_code == 422 and "stdio_allowed_commands" in refused.text
    # An allowed program with an environment of the caller's choosing runs whatever that names.
    preload = {
        "name": "fixture",
        "transport": "stdio",
        "command": command,
        "args": args,
        "env": {"PYTHONSTARTUP": "/x"},
    }
    assert setup.register(preload, "operator", "runner").status_code == 422
    # The grant alone is not enough without admin:registry, nor the allow-list without the grant.
    allowed = {"name": "fixture", "transport": "stdio", "command": command, "args": args}
    assert setup.register(allowed, "runner").status_code == 403
    assert setup.register(allowed, "operator").status_code == 403
    assert setup.stored() == [] and not setup.marker.exists()

    assert setup.register(allowed, "operator", "runner").status_code == 201
    token, _ = mint_token(
        SigningKeys(setup.gateway.signing_keys),
        setup.gateway.url,
        subject="alice",
        audience=setup.gateway.mcp("fixture"),
    )
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    headers = modern_headers("tools/list") | {"authorization": f"Bearer {token}"}
    listed = httpx.post(setup.gateway.mcp("fixture"), json=body, headers=headers, timeout=30)
    assert answer_of(listed)["result"]["tools"], listed.text
