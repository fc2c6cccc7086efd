"""A login at the built-in authorization server finishes on whichever node its next request reaches:
two `agentgw serve` processes on one PostgreSQL database (a database of the test's own), with one
public URL, as behind a load balancer without stickiness. A code issued by one node is redeemed at
the other; a sign-in at the organisation's provider (the npm `oidc-provider` fixture) started on one
node comes back to the other, and its `state` replayed at the first is refused. With the database
unreachable, the server says so in OAuth's terms and keeps nothing half done."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agentgw.oauth.server import hash_password
from conformance.fixtures.launch import free_port, start_process
from tests.e2e.test_oauth_federation import (
    IDP_CLIENT,
    OIDC,
    POLICY,
    answer_of,
    authorization_url,
    browse,
    oidc_provider_install,  # noqa: F401  (a fixture this module uses)
    provider_settings,
)
from tests.e2e.test_oauth_login import REDIRECT_URI, pkce, refresh, register
from tests.support.gateway import RunningGateway, data_dir_of, gateway_args, write_config
from tests.support.postgres import fresh_database
from tests.support.proxy import TcpProxy

LOCAL = ("carol", "local-pass")  # a local user; alice signs in at the provider


def _config(modern_upstream: str, public_url: str, **auth: Any) -> dict[str, Any]:
    return {
        "public_url": public_url,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        "auth": {
            "builtin": {
                "registration": {"per_address_per_minute": 1000},
                "users": [{"name": LOCAL[0], "password_hash": hash_password(LOCAL[1])}],
                "clients": [{"client_id": "app", "redirect_uris": [REDIRECT_URI]}],
            }
            | auth
        },
    }


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory,
    modern_upstream: str,
    oidc_provider_install: tuple[str, str],  # noqa: F811  (the fixture imported above)
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    """Nodes A and B; the public URL (the issuer, the provider's callback) is A's."""
    node, installed = oidc_provider_install
    idp_port, port_a, port_b = free_port(), free_port(), free_port()
    public = f"http://127.0.0.1:{port_a}"
    root = tmp_path_factory.mktemp("shared-login")
    (root / "idp-secret").write_text(IDP_CLIENT[1])
    idp_args = [
        node,
        str(OIDC / "idp.mjs"),
        installed,
        str(idp_port),
        *IDP_CLIENT,
        f"{public}/oauth/callback",
    ]
    config = _config(
        modern_upstream, public, identity_provider=provider_settings(f"http://127.0.0.1:{idp_port}")
    )
    config["secrets"] = {"idp": {"file": str(root / "idp-secret")}}
    config["budgets"] = {"store": "sql"}  # local counters belong to one process
    homes = root / "a", root / "b"
    for home in homes:
        home.mkdir()
    paths = [write_config(home, config) for home in homes]
    with fresh_database() as name, start_process(idp_args, idp_port):
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        with start_process(gateway_args(paths[0], port_a, database_url), port_a) as a:
            # B signs with A's keys, as every node behind one public URL must.
            shutil.copytree(data_dir_of(homes[0]), data_dir_of(homes[1]), dirs_exist_ok=True)
            with start_process(gateway_args(paths[1], port_b, database_url), port_b) as b:
                yield RunningGateway(a, paths[0], database_url), RunningGateway(b, paths[1], database_url)


def _params(client_id: str, challenge: str, resource: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
    }


def _password_login(node: RunningGateway, client_id: str, challenge: str, resource: str) -> httpx.Response:
    form = _params(client_id, challenge, resource) | {"username": LOCAL[0], "password": LOCAL[1]}
    return httpx.post(f"{node.url}/oauth/authorize", data=form, timeout=10)


def _redeem(node: RunningGateway, client_id: str, code: str, verifier: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    return httpx.post(f"{node.url}/oauth/token", data=form, timeout=10)


def _code(answer: httpx.Response) -> str:
    assert answer.status_code == 302, answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]


def test_a_code_issued_by_one_node_is_redeemed_at_the_other_once(
    nodes: tuple[RunningGateway, RunningGateway],
) -> None:
    a, b = nodes
    client_id = register(b, client_name="shared").json()["client_id"]  # registered at B, used at A
    verifier, challenge = pkce()
    code = _code(_password_login(a, client_id, challenge, a.mcp()))
    tokens = _redeem(b, client_id, code, verifier)
    assert tokens.status_code == 200, tokens.text
    assert refresh(a, client_id, tokens.json()["refresh_token"]).status_code == 200
    replayed = _redeem(a, client_id, code, verifier)
    assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"


def test_a_sign_in_at_the_provider_started_on_one_node_finishes_on_the_other(
    nodes: tuple[RunningGateway, RunningGateway],
) -> None:
    a, b = nodes
    client_id = register(a, client_name="roaming").json()["client_id"]
    verifier, challenge = pkce()
    # The browser starts at A and stops when the provider sends it back to the gateway's callback.
    back = browse(
        authorization_url(a, client_id, challenge, state="mine"), "alice", stop=f"{a.url}/oauth/callback"
    )
    assert isinstance(back, str)
    # The load balancer hands the callback to B.
    finished = httpx.get(back.replace(a.url, b.url, 1), timeout=10)
    query = answer_of(finished.headers.get("location", finished))
    assert query["state"] == "mine" and "code" in query, query
    tokens = _redeem(a, client_id, query["code"], verifier)
    assert tokens.status_code == 200, tokens.text
    # The same answer from the provider, delivered again at A: its state was spent at B.
    replayed = httpx.get(back, timeout=10)
    assert replayed.status_code == 400 and "unknown or has expired" in replayed.text
    assert "sign-in user=alice roles=developer" in b.output()


def test_with_the_database_unreachable_the_server_refuses_clearly_and_keeps_no_half_login(
    tmp_path: Path, modern_upstream: str, own_postgres: str, postgres_proxy: TcpProxy
) -> None:
    port = free_port()
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:{postgres_proxy.port}/{own_postgres}"
    config = _config(modern_upstream, f"http://127.0.0.1:{port}")
    config["database"] = {"statement_timeout_s": 1.0}
    path = write_config(tmp_path, config)
    with start_process(gateway_args(path, port, database_url), port) as process:
        node = RunningGateway(process, path, database_url)
        verifier, challenge = pkce()
        before = _code(_password_login(node, "app", challenge, node.mcp()))
        registered = register(node, client_name="registered").json()["client_id"]

        postgres_proxy.refuse()
        refused = _password_login(node, "app", challenge, node.mcp())
        assert refused.status_code == 302, refused.text
        answer = answer_of(refused.headers["location"])
        assert answer["error"] == "temporarily_unavailable" and answer["state"] == "st"
        assert "code" not in answer
        unavailable = _redeem(node, "app", before, verifier)
        assert unavailable.status_code == 503, unavailable.text
        assert unavailable.json()["error"] == "temporarily_unavailable"
        assert unavailable.headers["cache-control"] == "no-store"
        # A registered client cannot be read: it cannot be redirected to either.
        unknown = _password_login(node, registered, challenge, node.mcp())
        assert unknown.status_code == 503 and unknown.json()["error"] == "temporarily_unavailable"
        # Revocation cannot be recorded: the client is told to retry (RFC 7009), not given a 500.
        revoked = httpx.post(
            f"{node.url}/oauth/revoke", data={"token": "any-refresh-token", "client_id": "app"}, timeout=10
        )
        assert revoked.status_code == 503, revoked.text
        assert revoked.json()["error"] == "temporarily_unavailable"

        postgres_proxy.resume()
        # The refused redemption did not spend the code: it works, once.
        assert _redeem(node, "app", before, verifier).status_code == 200
        assert _redeem(node, "app", before, verifier).json()["error"] == "invalid_grant"
        assert "database unavailable" in node.output()
