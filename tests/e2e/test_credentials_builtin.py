"""Upstream credentials end to end with the gateway's built-in authorization server as the STS: a real
gateway, and upstream MCP servers that validate every bearer token they get (signature through the
gateway's JWKS, audience = themselves, `act` naming the gateway, scopes) and record each one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from agentgw.oauth.exchange import TOKEN_EXCHANGE
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import hash_secret, mint_token
from conformance.fixtures import mcp_protected_upstream
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import data_dir_of, gateway_args, write_config
from tests.support.mcp import META, MODERN, answer_of, modern_headers

CLIENT_SECRET = "gw-client-secret-4f9a1c"  # the gateway's own secret at its built-in server
STATIC_KEY = "static-vault-key-77b2e0"


@dataclass
class Setup:
    gateway: FixtureProcess
    keys_path: Path
    payments: str  # token exchange (per caller)
    ledger: str  # client credentials (the gateway's identity)
    vault: str  # a static key

    @property
    def url(self) -> str:
        return self.gateway.url

    def user_token(self, subject: str = "alice", server: str = "payments", **extra: Any) -> str:
        options: dict[str, Any] = {
            "audience": f"{self.url}/mcp" if server == "*" else f"{self.url}/mcp/{server}",
            "client_id": "e2e-app",
            "scopes": ["payments"],
        }
        return mint_token(SigningKeys(self.keys_path), self.url, subject=subject, **(options | extra))[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("cred")
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    ports = [free_port() for _ in range(3)]
    with ExitStack() as stack:
        payments, ledger, vault = (
            stack.enter_context(start_process(args, p))
            for args, p in (
                (
                    mcp_protected_upstream.command(
                        ports[0], issuers=[gateway_url], actors=["agentgw"], scopes=["payments"]
                    ),
                    ports[0],
                ),
                (mcp_protected_upstream.command(ports[1], issuers=[gateway_url]), ports[1]),
                (mcp_protected_upstream.command(ports[2], static_key=STATIC_KEY), ports[2]),
            )
        )
        client = {"client_id": "agentgw", "secret": "client-secret"}
        config = {
            "log_level": "DEBUG",
            "servers": [
                {
                    "name": "payments",
                    "url": f"{payments.url}/mcp",
                    "credential": {"mode": "token_exchange", "client": client, "scopes": ["payments"]},
                },
                {
                    "name": "ledger",
                    "url": f"{ledger.url}/mcp",
                    "credential": {"mode": "client_credentials", "client": client},
                },
                {
                    "name": "vault",
                    "url": f"{vault.url}/mcp",
                    "credential": {"mode": "static", "secret": "vault-key"},
                },
            ],
            "secrets": {
                "client-secret": {"env": "AGW_E2E_CLIENT_SECRET"},
                "vault-key": {"env": "AGW_E2E_KEY"},
            },
            "policy": {"rules": ["p, user:alice, mcp:*, *, allow", "p, user:root, admin:*, *, allow"]},
            "auth": {
                "builtin": {
                    "clients": [
                        {
                            "client_id": "agentgw",
                            "client_secret_sha256": hash_secret(CLIENT_SECRET),
                            "grant_types": ["client_credentials", TOKEN_EXCHANGE],
                            "exchange": {"audiences": [f"{payments.url}/mcp", f"{ledger.url}/mcp"]},
                        }
                    ]
                }
            },
        }
        config_path = write_config(tmp, config)
        env = {"AGW_E2E_CLIENT_SECRET": CLIENT_SECRET, "AGW_E2E_KEY": STATIC_KEY}
        database_url = f"sqlite:///{tmp / 'agentgw.db'}"
        gateway = stack.enter_context(
            start_process(gateway_args(config_path, port, database_url), port, env=env)
        )
        yield Setup(gateway, data_dir_of(tmp) / "oauth-keys.json", payments.url, ledger.url, vault.url)


def rpc(setup: Setup, server: str, token: str | None, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One 2026-07-28 request through the pass-through; the JSON-RPC answer (JSON or one SSE event)."""
    headers = modern_headers(method, params["name"] if method == "tools/call" else None)
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    response = httpx.post(f"{setup.url}/mcp/{server}", json=body, headers=headers, timeout=30)
    return answer_of(response)


def whoami(setup: Setup, server: str, token: str) -> dict[str, Any]:
    answer = rpc(setup, server, token, "tools/call", {"name": "whoami", "arguments": {}})
    assert "result" in answer, answer
    text: str = answer["result"]["content"][0]["text"]
    seen: dict[str, Any] = json.loads(text)
    return seen


def received(upstream: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{upstream}/_fixture/received").json()
    return records


@asynccontextmanager
async def sdk_client(url: str, token: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http), mode=MODERN) as client,
    ):
        yield client


def test_a_validating_upstream_accepts_the_exchanged_token_naming_the_user_and_the_gateway(
    setup: Setup,
) -> None:
    seen = whoami(setup, "payments", setup.user_token())
    assert seen["sub"] == "alice" and seen["act"] == {"sub": "agentgw"}
    assert seen["aud"] == f"{setup.payments}/mcp" and seen["iss"] == setup.url and seen["scope"] == "payments"
    assert all(r["status"] == 200 for r in received(setup.payments))


def test_client_credentials_and_static_keys_pass_the_upstreams_checks(setup: Setup) -> None:
    seen = whoami(setup, "ledger", setup.user_token(server="ledger"))
    assert seen["sub"] == "agentgw" and seen["aud"] == f"{setup.ledger}/mcp" and seen["act"] is None
    assert whoami(setup, "vault", setup.user_token(server="vault")) == {"static": True}


async def test_the_merged_endpoint_bridges_gateway_identity_upstreams_and_leaves_per_caller_ones_out(
    setup: Setup,
) -> None:
    async with sdk_client(f"{setup.url}/mcp", setup.user_token(server="*")) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("ledger__whoami", {})
    assert {"ledger__whoami", "vault__whoami", "ledger__pay"} <= names
    assert not any(name.startswith("payments__") for name in names)
    assert json.loads(result.content[0].text)["sub"] == "agentgw"  # type: ignore[union-attr]


def test_the_callers_token_never_reaches_any_upstream(setup: Setup) -> None:
    tokens = [setup.user_token(server=s) for s in ("payments", "ledger", "vault")]
    for server, token in zip(("payments", "ledger", "vault"), tokens, strict=True):
        whoami(setup, server, token)
    headers = [
        r["authorization"] or "" for u in (setup.payments, setup.ledger, setup.vault) for r in received(u)
    ]
    assert headers and all(h.startswith("Bearer ") for h in headers)
    for token in tokens:
        assert not any(token in h for h in headers)


def test_a_user_who_forbids_the_gateway_to_act_gets_a_clear_error_and_an_audit_record(setup: Setup) -> None:
    keys = SigningKeys(setup.keys_path)
    base = setup.user_token(subject="alice")
    token = keys.sign(
        {**jwt.decode(base, options={"verify_signature": False}), "may_act": {"sub": "other-gw"}}
    )
    before = len(received(setup.payments))
    answer = rpc(setup, "payments", token, "tools/call", {"name": "whoami", "arguments": {}})
    assert "invalid_grant" in answer["error"]["message"] and answer["error"]["data"] == {
        "error": "invalid_grant"
    }
    assert len(received(setup.payments)) == before  # nothing went upstream
    admin = setup.user_token(subject="root", server="admin", audience=f"{setup.url}/admin", scopes=[])
    records = httpx.get(
        f"{setup.url}/admin/audit/records",
        params={"resource": "mcp:payments/whoami"},
        headers={"authorization": f"Bearer {admin}"},
    ).json()
    refusals = [r for r in records["records"] if r.get("reason") == "credential_error"]
    assert refusals and "invalid_grant" in refusals[-1]["detail"]


def test_secrets_appear_neither_in_the_gateway_output_nor_in_the_admin_api(setup: Setup) -> None:
    whoami(setup, "payments", setup.user_token())
    admin = setup.user_token(subject="root", server="admin", audience=f"{setup.url}/admin", scopes=[])
    listing = httpx.get(f"{setup.url}/admin/registry/servers", headers={"authorization": f"Bearer {admin}"})
    # The admin API names the secret, never its value nor where it lives.
    assert listing.status_code == 200 and '"secret":"client-secret"' in listing.text
    assert "AGW_E2E_CLIENT_SECRET" not in listing.text
    issued = [
        r["authorization"].removeprefix("Bearer ")
        for u in (setup.payments, setup.ledger)
        for r in received(u)
    ]
    output = setup.gateway.output()
    assert "DEBUG" in output or "INFO" in output  # the gateway did log, at debug level
    for secret in (CLIENT_SECRET, STATIC_KEY, *issued):
        assert secret not in output
        assert secret not in listing.text


def test_a_missing_secret_stops_the_gateway_at_start_up_naming_the_variable(tmp_path: Path) -> None:
    config = {
        "servers": [
            {
                "name": "vault",
                "url": "http://127.0.0.1:9/mcp",
                "credential": {"mode": "static", "secret": "unset"},
            }
        ],
        "secrets": {"unset": {"env": "AGW_E2E_UNSET"}},
        "policy": {"allow_empty": True},
    }
    port = free_port()
    args = gateway_args(write_config(tmp_path, config), port, f"sqlite:///{tmp_path / 'db.sqlite'}")
    with (
        pytest.raises(Exception, match="AGW_E2E_UNSET is not set"),
        start_process(args, port, ready_within=20),
    ):
        pass


def test_the_audit_record_names_the_credential_mode_and_the_chain_the_upstream_saw(setup: Setup) -> None:
    whoami(setup, "payments", setup.user_token())
    whoami(setup, "ledger", setup.user_token(server="ledger"))
    admin = setup.user_token(subject="root", server="admin", audience=f"{setup.url}/admin", scopes=[])

    def latest(resource: str) -> dict[str, Any]:
        records = httpx.get(
            f"{setup.url}/admin/audit/records",
            params={"resource": resource, "decision": "allowed"},
            headers={"authorization": f"Bearer {admin}"},
        ).json()["records"]
        outcome: dict[str, Any] = [r for r in records if r["event"] == "outcome"][-1]
        return outcome

    exchanged = latest("mcp:payments/whoami")
    assert (exchanged["credential_mode"], exchanged["upstream_actors"]) == (
        "token_exchange",
        ["client:agentgw"],
    )
    assert exchanged["subject"] == "user:alice"
    own = latest("mcp:ledger/whoami")
    assert (own["credential_mode"], own["upstream_actors"]) == ("client_credentials", [])
