"""Token exchange at an external STS end to end: an independently configured authlib authorization
server (the enterprise IdP, which also issues the users' tokens), a second one as an upstream's own
authorization server (ID-JAG), validating upstreams, and a gateway that trusts the IdP. Covers the
STS refusing, slow or down, expired exchanged tokens, upstream 401s, and concurrent first calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from agentgw.oauth.exchange import ID_JAG_TOKEN_TYPE, JWT_BEARER, TOKEN_EXCHANGE
from conformance.fixtures import mcp_protected_upstream, sts
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import gateway_args, write_config
from tests.support.mcp import META, answer_of, modern_headers

IDP_SECRET = "idp-client-secret-8c1d"
AS_SECRET = "as-client-secret-2e7f"


@dataclass
class Setup:
    gateway: FixtureProcess
    idp: str
    authorization_server: str
    upstream: str  # trusts the IdP's tokens
    jag_upstream: str  # trusts the upstream authorization server's tokens
    private_pem: str

    def user_token(self, subject: str, server: str = "pay") -> str:
        answer = httpx.post(
            f"{self.idp}/_fixture/mint",
            json={
                "sub": subject,
                "aud": f"{self.gateway.url}/mcp/{server}",
                "scope": "payments payments.write",
                "roles": ["staff"],
            },
        )
        token: str = answer.json()["access_token"]
        return token


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("sts")
    idp_port, as_port, up_port, jag_port, gw_port, dead_port = (free_port() for _ in range(6))
    idp, as_url = f"http://127.0.0.1:{idp_port}", f"http://127.0.0.1:{as_port}"
    upstream, jag_upstream = f"http://127.0.0.1:{up_port}/mcp", f"http://127.0.0.1:{jag_port}/mcp"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (tmp / "gateway-pk.pem").write_text(pem)
    public = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "pk1", "alg": "RS256"}
    exchange_grants = ["client_credentials", TOKEN_EXCHANGE]
    idp_config = {
        "clients": [
            {
                "client_id": "gateway",
                "secret": IDP_SECRET,
                "audiences": [upstream, as_url],
                "grant_types": exchange_grants,
            },
            {
                "client_id": "gateway-pk",
                "jwks": {"keys": [public]},
                "audiences": [upstream],
                "grant_types": exchange_grants,
            },
        ]
    }
    as_config = {
        "clients": [
            {
                "client_id": "gateway",
                "secret": AS_SECRET,
                "audiences": [jag_upstream],
                "grant_types": [JWT_BEARER],
            }
        ],
        "trusted_issuers": [idp],
    }
    (tmp / "idp.json").write_text(json.dumps(idp_config))
    (tmp / "as.json").write_text(json.dumps(as_config))
    exchange = {
        "mode": "token_exchange",
        "token_url": f"{idp}/token",
        "client": {"client_id": "gateway", "secret": "idp-secret"},
        "scopes": ["payments"],
        "tool_scopes": {"pay": ["payments.write"]},
    }
    config = {
        "log_level": "DEBUG",
        "auth": {"issuers": [{"issuer": idp}], "builtin": {"enabled": False}},
        "policy": {"rules": ["p, role:staff, mcp:*, *, allow"]},
        "secrets": {
            "idp-secret": {"env": "AGW_E2E_IDP_SECRET"},
            "as-secret": {"env": "AGW_E2E_AS_SECRET"},
            "gateway-pk": {"file": str(tmp / "gateway-pk.pem")},
        },
        "servers": [
            {"name": "pay", "url": upstream, "credential": exchange},
            {
                "name": "pay-pk",
                "url": upstream,
                "credential": exchange
                | {
                    "client": {
                        "client_id": "gateway-pk",
                        "method": "private_key_jwt",
                        "secret": "gateway-pk",
                        "key_id": "pk1",
                    }
                },
            },
            {"name": "pay-slow", "url": upstream, "credential": exchange | {"timeout_s": 1}},
            {
                "name": "pay-down",
                "url": upstream,
                "credential": exchange | {"token_url": f"http://127.0.0.1:{dead_port}/token"},
            },
            {
                "name": "pay-jag",
                "url": jag_upstream,
                "credential": {
                    "mode": "id_jag",
                    "idp_token_url": f"{idp}/token",
                    "idp_client": {"client_id": "gateway", "secret": "idp-secret"},
                    "authorization_server": as_url,
                    "token_url": f"{as_url}/token",
                    "client": {"client_id": "gateway", "secret": "as-secret"},
                    "scopes": ["payments"],
                },
            },
        ],
    }
    env = {"AGW_E2E_IDP_SECRET": IDP_SECRET, "AGW_E2E_AS_SECRET": AS_SECRET}
    with ExitStack() as stack:
        for args, port in (
            (sts.command(idp_port, str(tmp / "idp.json")), idp_port),
            (sts.command(as_port, str(tmp / "as.json")), as_port),
            (
                mcp_protected_upstream.command(
                    up_port, issuers=[idp], actors=["gateway", "gateway-pk"], scopes=["payments"]
                ),
                up_port,
            ),
            (mcp_protected_upstream.command(jag_port, issuers=[as_url], actors=["gateway"]), jag_port),
        ):
            stack.enter_context(start_process(args, port))
        args = gateway_args(write_config(tmp, config), gw_port, f"sqlite:///{tmp / 'agentgw.db'}")
        gateway = stack.enter_context(start_process(args, gw_port, env=env))
        yield Setup(
            gateway, idp, as_url, upstream.removesuffix("/mcp"), jag_upstream.removesuffix("/mcp"), pem
        )


@pytest.fixture(autouse=True)
def fresh(setup: Setup) -> None:
    for base in (setup.idp, setup.authorization_server, setup.upstream, setup.jag_upstream):
        httpx.post(f"{base}/_fixture/reset").raise_for_status()


def body(tool: str = "whoami", arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {"name": tool, "arguments": arguments or {}, "_meta": META}
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}


def headers(token: str, tool: str = "whoami") -> dict[str, str]:
    return modern_headers("tools/call", tool) | {"authorization": f"Bearer {token}"}


def call(setup: Setup, server: str, token: str, tool: str = "whoami", **arguments: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{setup.gateway.url}/mcp/{server}",
        json=body(tool, arguments),
        headers=headers(token, tool),
        timeout=30,
    )
    return answer_of(response)


def seen_by_upstream(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" in answer, answer
    claims: dict[str, Any] = json.loads(answer["result"]["content"][0]["text"])
    return claims


def sts_requests(base: str, grant_type: str | None = None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{base}/_fixture/requests").json()
    return [r for r in records if grant_type is None or r["grant_type"] == grant_type]


def received(base: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(f"{base}/_fixture/received").json()
    return records


def behave(setup: Setup, **behaviour: Any) -> None:
    httpx.post(f"{setup.idp}/_fixture/behaviour", json=behaviour).raise_for_status()


def test_the_external_sts_exchanges_the_users_token_for_one_the_upstream_accepts(setup: Setup) -> None:
    caller = setup.user_token("alice")
    claims = seen_by_upstream(call(setup, "pay", caller))
    assert claims["iss"] == setup.idp and claims["sub"] == "alice" and claims["act"] == {"sub": "gateway"}
    assert claims["aud"] == f"{setup.upstream}/mcp" and claims["scope"] == "payments"
    [actor] = sts_requests(setup.idp, "client_credentials")
    [exchange] = sts_requests(setup.idp, TOKEN_EXCHANGE)
    assert actor["auth"] == exchange["auth"] == "client_secret_basic" and exchange["has_actor_token"]
    assert exchange["subject"] == "alice" and exchange["resource"] == f"{setup.upstream}/mcp"
    assert all(caller not in (r["authorization"] or "") for r in received(setup.upstream))


def test_a_tool_with_its_own_scopes_gets_a_token_with_them(setup: Setup) -> None:
    caller = setup.user_token("tool-scopes")
    assert "paid 5" in json.dumps(call(setup, "pay", caller, "pay", amount=5))
    assert [r["scope"] for r in sts_requests(setup.idp, TOKEN_EXCHANGE)] == ["payments payments.write"]


def test_the_gateway_authenticates_with_private_key_jwt(setup: Setup) -> None:
    claims = seen_by_upstream(call(setup, "pay-pk", setup.user_token("pk-user", "pay-pk")))
    assert claims["act"] == {"sub": "gateway-pk"}
    assert {r["auth"] for r in sts_requests(setup.idp)} == {"private_key_jwt"}


@pytest.mark.parametrize("refusal", ["invalid_target", "invalid_grant"])
def test_an_sts_refusal_fails_the_call_with_its_error_and_nothing_goes_upstream(
    setup: Setup, refusal: str
) -> None:
    behave(setup, exchange=refusal)
    answer = call(setup, "pay", setup.user_token(f"refused-{refusal}"))
    assert refusal in answer["error"]["message"] and answer["error"]["data"] == {"error": refusal}
    assert received(setup.upstream) == []


def test_a_slow_sts_fails_the_call_at_the_configured_timeout(setup: Setup) -> None:
    behave(setup, exchange="slow", delay_s=4)
    started = time.monotonic()
    answer = call(setup, "pay-slow", setup.user_token("slow-user", "pay-slow"))
    assert (
        "subject token exchange failed: the token service did not answer within 1s"
        in answer["error"]["message"]
    )
    assert time.monotonic() - started < 3.5 and received(setup.upstream) == []


def test_an_sts_that_is_down_fails_the_call_clearly(setup: Setup) -> None:
    answer = call(setup, "pay-down", setup.user_token("down-user", "pay-down"))
    assert "token service is unreachable" in answer["error"]["message"]
    assert received(setup.upstream) == []


def test_an_expired_exchanged_token_is_refused_upstream_then_replaced_once(setup: Setup) -> None:
    behave(setup, exchange="expired", times=1)  # one token whose exp is in the past, though it says 600 s
    claims = seen_by_upstream(call(setup, "pay", setup.user_token("expiring")))
    assert claims["sub"] == "expiring"
    assert [(r["status"], r["reason"]) for r in received(setup.upstream)] == [(401, "expired"), (200, "ok")]
    assert len(sts_requests(setup.idp, TOKEN_EXCHANGE)) == 2


def test_a_401_from_the_upstream_drops_the_token_and_retries_once(setup: Setup) -> None:
    caller = setup.user_token("revoked")
    seen_by_upstream(call(setup, "pay", caller))  # a cached token now
    httpx.post(f"{setup.upstream}/_fixture/reject", json={"count": 1}).raise_for_status()
    seen_by_upstream(call(setup, "pay", caller))
    first, refused, retried = received(setup.upstream)
    assert refused["authorization"] == first["authorization"] != retried["authorization"]
    assert refused["status"] == 401 and retried["status"] == 200
    httpx.post(f"{setup.upstream}/_fixture/reject", json={"count": 2}).raise_for_status()
    answer = call(setup, "pay", caller)
    assert "refused the gateway's credential" in answer["error"]["message"]
    assert len(received(setup.upstream)) == 5  # exactly one retry
    assert len(sts_requests(setup.idp, TOKEN_EXCHANGE)) == 3


async def test_fifty_concurrent_first_calls_make_one_exchange(setup: Setup) -> None:
    caller = setup.user_token("fifty")
    async with httpx.AsyncClient(timeout=30) as http:
        responses = await asyncio.gather(
            *(
                http.post(f"{setup.gateway.url}/mcp/pay", json=body(), headers=headers(caller))
                for _ in range(50)
            )
        )
    assert all(seen_by_upstream(answer_of(r))["sub"] == "fifty" for r in responses)
    assert len(sts_requests(setup.idp, TOKEN_EXCHANGE)) == 1
    assert len({r["authorization"] for r in received(setup.upstream)}) == 1


def test_id_jag_gets_a_grant_at_the_idp_and_a_token_at_the_upstreams_server(setup: Setup) -> None:
    caller = setup.user_token("jag-user", "pay-jag")
    claims = seen_by_upstream(call(setup, "pay-jag", caller))
    assert claims["iss"] == setup.authorization_server and claims["sub"] == "jag-user"
    assert claims["aud"] == f"{setup.jag_upstream}/mcp" and claims["act"] == {"sub": "gateway"}
    [grant] = sts_requests(setup.idp, TOKEN_EXCHANGE)
    assert (
        grant["requested_token_type"] == ID_JAG_TOKEN_TYPE and grant["audience"] == setup.authorization_server
    )
    [bearer] = sts_requests(setup.authorization_server, JWT_BEARER)
    assert bearer["outcome"] == 200
    assert all(caller not in (r["authorization"] or "") for r in received(setup.jag_upstream))


def test_no_secret_or_token_reaches_the_gateway_output(setup: Setup) -> None:
    caller = setup.user_token("logged")
    call(setup, "pay", caller)
    call(setup, "pay-pk", setup.user_token("logged", "pay-pk"))
    behave(setup, exchange="invalid_grant")
    call(setup, "pay", setup.user_token("logged-refused"))
    output = setup.gateway.output()
    issued = [r["authorization"].removeprefix("Bearer ") for r in received(setup.upstream)]
    pem_body = "".join(setup.private_pem.splitlines()[1:-1])[:40]
    assert "invalid_grant" in output  # refusals are logged, by their code
    for secret in (IDP_SECRET, AS_SECRET, caller, pem_body, *issued):
        assert secret not in output
    assert "PRIVATE KEY" not in output
