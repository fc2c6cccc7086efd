"""An operator (`admin:registry`) cannot make the gateway read a file or variable of their choosing and
send it upstream: credentials name secrets declared in the config file, each only for the destinations
it is declared for, and the gateway's own key material is never a secret, however it is spelled."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgw.app import GatewayApp, create_app
from agentgw.cli import main
from agentgw.errors import ConfigError
from agentgw.identity import signing_keys
from agentgw.oauth.server import mint_token
from agentgw.registry.secrets import SecretRefused, Secrets, SecretSource
from agentgw.settings import load_settings
from tests.support.mcp import modern_headers
from tests.support.servers import Answer, LocalServer, Scripted

BASE = "http://127.0.0.1:8080"
POLICY = [
    "p, role:operator, admin:registry, *, allow",
    "p, user:alice, mcp:*, *, allow",
]
PAT = "ghp-the-real-personal-access-token"


@dataclass
class Gateway:
    app: GatewayApp
    http: httpx.AsyncClient
    upstream: Scripted
    upstream_url: str
    keys_file: Path

    def bearer(self, subject: str, audience: str, *roles: str) -> dict[str, str]:
        token, _ = mint_token(
            self.app.state.gateway.identity.keys, BASE, subject=subject, audience=audience, roles=roles
        )
        return {"authorization": f"Bearer {token}"}

    def operator(self) -> dict[str, str]:
        return self.bearer("mallory", f"{BASE}/admin", "operator")

    async def register(self, spec: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/admin/registry/servers", json=spec, headers=self.operator())

    async def call(self, server: str) -> httpx.Response:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = modern_headers("tools/list") | self.bearer("alice", f"{BASE}/mcp/{server}")
        return await self.http.post(f"/mcp/{server}", json=body, headers=headers)

    def authorizations(self) -> list[str]:
        return [r.headers.get("authorization", "") for r in self.upstream.received]


def _empty_list(_request: object) -> Answer:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}).encode()
    return Answer(200, [body], {"content-type": "application/json"})


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("SECURITY_TEST_PAT", PAT)
    upstream, server = Scripted(_empty_list), LocalServer()
    settings = load_settings(
        None,
        data_dir=tmp_path / "state",
        policy={"rules": POLICY},
        secrets={
            "github-pat": {"env": "SECURITY_TEST_PAT", "send_to": [f"{server.url}/github"]},
            "config-only": {"env": "SECURITY_TEST_PAT"},
        },
    )
    app = create_app(settings)
    async with (
        server.serve(upstream),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http,
    ):
        yield Gateway(app, http, upstream, server.url, tmp_path / "state" / "oauth-keys.json")


@pytest.mark.parametrize(
    "credential",
    [
        pytest.param(lambda keys: {"mode": "static", "file": str(keys)}, id="static-file"),
        pytest.param(lambda keys: {"mode": "static", "env": "AGENTGW_DATABASE_URL"}, id="static-env"),
        pytest.param(
            lambda keys: {
                "mode": "client_credentials",
                "token_url": "http://127.0.0.1:9/token",
                "client": {"client_id": "x", "method": "client_secret_post", "file": str(keys)},
            },
            id="client-secret-file",
        ),
    ],
)
async def test_the_signing_key_cannot_be_stolen_through_a_server_registered_by_an_operator(
    gateway: Gateway, credential: Any
) -> None:
    keys = json.loads(gateway.keys_file.read_text())["keys"]
    registered = await gateway.register(
        {"name": "exfil", "url": f"{gateway.upstream_url}/mcp", "credential": credential(gateway.keys_file)}
    )
    assert registered.status_code == 422, registered.text
    assert "never an environment variable or a file" in registered.text
    listing = await gateway.http.get("/admin/registry/servers", headers=gateway.operator())
    assert listing.json() == []  # nothing stored
    await gateway.call("exfil")
    sent = " ".join(gateway.authorizations())
    assert keys[0]["kid"] not in sent and "PRIVATE KEY" not in sent


async def test_a_declared_secret_goes_only_where_it_is_declared_for(gateway: Gateway) -> None:
    elsewhere = await gateway.register(
        {
            "name": "elsewhere",
            "url": f"{gateway.upstream_url}/githubber/mcp",  # a prefix look-alike is not under it
            "credential": {"mode": "static", "secret": "github-pat"},
        }
    )
    assert elsewhere.status_code == 422 and "may not be sent to" in elsewhere.text
    config_only = await gateway.register(
        {
            "name": "sneaky",
            "url": f"{gateway.upstream_url}/github/mcp",
            "credential": {"mode": "static", "secret": "config-only"},
        }
    )
    assert config_only.status_code == 422 and "config file only" in config_only.text
    assert (await gateway.call("elsewhere")).status_code == 404
    assert PAT not in " ".join(gateway.authorizations())

    granted = await gateway.register(
        {
            "name": "github",
            "url": f"{gateway.upstream_url}/github/mcp",
            "credential": {"mode": "static", "secret": "github-pat"},
        }
    )
    assert granted.status_code == 201, granted.text
    assert (await gateway.call("github")).status_code == 200
    assert gateway.authorizations() == [f"Bearer {PAT}"]
    shown = await gateway.http.get("/admin/registry/servers/github", headers=gateway.operator())
    assert shown.json()["credential"] == {"mode": "static", "secret": "github-pat"}
    assert PAT not in shown.text and "SECURITY_TEST_PAT" not in shown.text


def test_the_config_file_cannot_declare_the_gateways_own_files_as_secrets(tmp_path: Path) -> None:
    state = tmp_path / "state"
    link = tmp_path / "innocent.txt"
    link.symlink_to(state / "oauth-keys.json")
    for source in (
        {"file": str(state / "oauth-keys.json")},
        {"file": str(link)},  # a link is followed to what it names
        {"file": str(tmp_path / "gw.db")},
        {"file": str(tmp_path / "gw.db-wal")},
        {"file": "/proc/self/environ"},  # every setting given by environment
    ):
        with pytest.raises(ConfigError, match="gateway's own state"):
            load_settings(
                None,
                data_dir=state,
                database_url=f"sqlite:///{tmp_path / 'gw.db'}",
                secrets={"stolen": source},
            )
    with pytest.raises(ConfigError, match="the gateway's own setting"):
        load_settings(None, data_dir=state, secrets={"stolen": {"env": "AGENTGW_DATABASE_URL"}})


def test_a_secret_file_swapped_for_a_link_to_the_keys_later_is_refused_at_read(tmp_path: Path) -> None:
    keys = tmp_path / "state" / "oauth-keys.json"
    keys.parent.mkdir()
    keys.write_text('{"keys": []}')
    secret = tmp_path / "token"
    secret.write_text("fine")
    secrets = Secrets({"token": SecretSource(file=secret)}, protected=[keys.parent])
    assert secrets.read("token").reveal() == "fine"
    secret.unlink()
    secret.symlink_to(keys)
    with pytest.raises(SecretRefused, match="gateway's own state"):
        secrets.read("token")


def test_registry_show_names_the_secret_never_where_it_lives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'state'}\n"
        "secrets: {github-pat: {file: /run/secrets/github-pat}}\n"
        "servers:\n"
        "  - {name: github, url: 'http://127.0.0.1:9/mcp', credential: {mode: static, secret: github-pat}}\n"
        "policy: {allow_empty: true}\n"
    )
    assert main(["registry", "show", "github", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown)["credential"] == {"mode": "static", "secret": "github-pat"}
    assert "/run/secrets" not in shown


def test_a_hard_link_to_the_signing_key_is_refused_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = load_settings(None, data_dir=state)
    keys = signing_keys(settings).path
    (tmp_path / "copy").hardlink_to(keys)
    with pytest.raises(ConfigError, match="gateway's own state"):
        load_settings(None, data_dir=state, secrets={"stolen": {"file": str(tmp_path / "copy")}})
