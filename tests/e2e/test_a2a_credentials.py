"""An A2A agent's credential from RFC 8693 token exchange at an external STS, end to end: the authlib
STS fixture (the IdP that also issues the users' tokens), the a2a-sdk fixture agent, and a gateway
process that trusts the IdP. The credentials stage obtains the agent's token, as it does for MCP
upstreams: the same cache, the same renewal, the same metrics."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentgw.oauth.exchange import TOKEN_EXCHANGE
from conformance.fixtures import sts
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import gateway_args, write_config

IDP_SECRET = "a2a-idp-client-secret-3f9a"
TIMEOUT = 20


@dataclass
class Setup:
    gateway: FixtureProcess
    idp: str
    agents: str
    metrics: str

    def user_token(self, subject: str) -> str:
        claims = {"sub": subject, "aud": f"{self.gateway.url}/a2a/exchanged", "roles": ["staff"]}
        answer = httpx.post(f"{self.idp}/_fixture/mint", json=claims, timeout=TIMEOUT)
        token: str = answer.json()["access_token"]
        return token

    def sts_requests(self, grant_type: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.idp}/_fixture/requests", timeout=TIMEOUT).json()
        return [r for r in records if r["grant_type"] == grant_type]

    def received(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.agents}/_fixture/received", timeout=TIMEOUT).json()
        return records

    def lookups(self, upstream: str) -> dict[str, float]:
        """The gateway's token cache lookups for `upstream`, by result, from its /metrics."""
        text = httpx.get(self.metrics, timeout=TIMEOUT).text
        return {
            sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "agentgw_token_cache_lookups_total" and sample.labels["upstream"] == upstream
        }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("a2a-credentials")
    idp_port, agents_port, port, metrics_port = (free_port() for _ in range(4))
    idp, agents = f"http://127.0.0.1:{idp_port}", f"http://127.0.0.1:{agents_port}"
    idp_config = {
        "clients": [
            {
                "client_id": "gateway",
                "secret": IDP_SECRET,
                "audiences": [f"{agents}/echo"],
                "grant_types": ["client_credentials", TOKEN_EXCHANGE],
            }
        ]
    }
    (tmp / "idp.json").write_text(json.dumps(idp_config))
    config = {
        "auth": {"issuers": [{"issuer": idp}], "builtin": {"enabled": False}},
        "policy": {"rules": ["p, role:staff, a2a:*, *, allow"]},
        "secrets": {"idp-secret": {"env": "AGW_E2E_IDP_SECRET"}},
        "metrics": {"port": metrics_port},
        "a2a_agents": [
            {
                "name": "exchanged",
                "card_url": f"{agents}/echo/.well-known/agent-card.json",
                "default_skill": "echo",
                "credential": {
                    "mode": "token_exchange",
                    "token_url": f"{idp}/token",
                    "client": {"client_id": "gateway", "secret": "idp-secret"},
                },
            }
        ],
    }
    args = gateway_args(write_config(tmp, config), port, f"sqlite:///{tmp / 'agentgw.db'}")
    with ExitStack() as stack:
        stack.enter_context(start_process(sts.command(idp_port, str(tmp / "idp.json")), idp_port))
        stack.enter_context(start_process(agents_args(["echo"], agents_port), agents_port))
        gateway = stack.enter_context(start_process(args, port, env={"AGW_E2E_IDP_SECRET": IDP_SECRET}))
        yield Setup(gateway, idp, agents, f"http://127.0.0.1:{metrics_port}/metrics")


def send(setup: Setup, token: str, text: str) -> dict[str, Any]:
    message = {"role": "ROLE_USER", "messageId": f"{text}-{uuid.uuid4().hex}", "parts": [{"text": text}]}
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
    headers = {"a2a-version": "1.0", "authorization": f"Bearer {token}"}
    url = f"{setup.gateway.url}/a2a/exchanged"
    answer: dict[str, Any] = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT).json()
    return answer


def seen_by_agent(setup: Setup, text: str) -> str:
    """The Authorization header the agent received with the message whose id starts with `text`."""
    record = next(r for r in setup.received() if str(r.get("message_id", "")).startswith(f"{text}-"))
    authorization: str = record["authorization"]
    return authorization


def test_the_agent_gets_a_token_exchanged_by_the_credentials_stage_and_cached(setup: Setup) -> None:
    alice, bob = setup.user_token("alice"), setup.user_token("bob")
    for n in range(3):
        assert "result" in send(setup, alice, f"alice{n}")
    assert "result" in send(setup, bob, "bob0")

    sent = [seen_by_agent(setup, text) for text in ("alice0", "alice1", "alice2", "bob0")]
    assert all(s.startswith("Bearer ") for s in sent)
    tokens = [s.removeprefix("Bearer ") for s in sent]
    assert not {alice, bob} & set(tokens), "the agent never sees a caller's own token"
    assert tokens[0] == tokens[1] == tokens[2] != tokens[3], "one token per caller, reused"
    claims = jwt.decode(tokens[0], options={"verify_signature": False})
    assert (claims["iss"], claims["sub"], claims["act"]) == (setup.idp, "alice", {"sub": "gateway"})
    assert claims["aud"] in (f"{setup.agents}/echo", [f"{setup.agents}/echo"])

    exchanges = setup.sts_requests(TOKEN_EXCHANGE)
    assert [(e["subject"], e["resource"]) for e in exchanges] == [
        ("alice", f"{setup.agents}/echo"),
        ("bob", f"{setup.agents}/echo"),
    ], "one exchange per caller: the repeated calls were served from the cache"
    assert len(setup.sts_requests("client_credentials")) == 1, "the gateway's actor token, shared"
    # The stage's own cache served every call: a token obtained anywhere else would not be counted.
    # Misses: alice's token, the actor token, bob's token; hits: alice twice, the actor token for bob.
    assert setup.lookups("a2a:exchanged") == {"miss": 3, "hit": 3}
