"""A2A card signatures and agent credentials end to end: a real gateway (built-in authorization server
on) in front of the fixture agents started with signed cards (`--signed`), and A2A agents reached with a
token from the built-in server's token exchange or client credentials grant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from a2a.client import A2ACardResolver
from a2a.utils.signing import InvalidSignaturesError, create_signature_verifier
from jwt import PyJWK

from agentgw.ingress.a2a.signatures import read_card
from agentgw.oauth.exchange import TOKEN_EXCHANGE
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import hash_secret, mint_token
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import data_dir_of, gateway_args, write_config

CLIENT_SECRET = "a2a-gw-client-secret-81c2"  # the gateway's own secret at its built-in server
TIMEOUT = 20


@dataclass
class Setup:
    gateway: FixtureProcess
    agents: str
    keys_path: Path

    def agent(self, name: str) -> str:
        return f"{self.gateway.url}/a2a/{name}"

    def user_token(self, agent: str, subject: str = "alice") -> str:
        keys = SigningKeys(self.keys_path)
        audience = self.agent(agent)
        return mint_token(keys, self.gateway.url, subject=subject, audience=audience, client_id="e2e-app")[0]

    def received(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.agents}/_fixture/received").json()
        return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("a2a-security")
    agents_port, port = free_port(), free_port()
    agents = f"http://127.0.0.1:{agents_port}"
    keys = {"jwks_uri": f"{agents}/_fixture/jwks"}
    echo_card = f"{agents}/echo/.well-known/agent-card.json"
    client = {"client_id": "agentgw", "secret": "client-secret"}
    config = {
        "allow_anonymous": True,
        "a2a_agents": [
            {"name": "signed", "card_url": echo_card, "card_keys": keys},
            {"name": "tampered", "card_url": f"{agents}/_fixture/card-tampered/echo", "card_keys": keys},
            {"name": "wrongkey", "card_url": f"{agents}/_fixture/card-wrong-key/echo", "card_keys": keys},
            {"name": "unsigned", "card_url": f"{agents}/_fixture/card-unsigned/echo", "card_keys": keys},
            {
                "name": "exchanged",
                "card_url": echo_card,
                "default_skill": "echo",
                "credential": {"mode": "token_exchange", "client": client},
            },
            {
                "name": "own",
                "card_url": echo_card,
                "default_skill": "echo",
                "credential": {"mode": "client_credentials", "client": client},
            },
        ],
        "secrets": {"client-secret": {"env": "AGW_E2E_A2A_SECRET"}},
        "policy": {"rules": ["p, anonymous, a2a:*, *", "p, user:alice, a2a:*, *"]},
        "auth": {
            "builtin": {
                "clients": [
                    {
                        "client_id": "agentgw",
                        "client_secret_sha256": hash_secret(CLIENT_SECRET),
                        "grant_types": ["client_credentials", TOKEN_EXCHANGE],
                        "exchange": {"audiences": [f"{agents}/echo"]},
                    }
                ]
            }
        },
    }
    config_path = write_config(tmp, config)
    database_url = f"sqlite:///{tmp / 'agentgw.db'}"
    with ExitStack() as stack:
        stack.enter_context(start_process(agents_args(["echo"], agents_port, signed=True), agents_port))
        env = {"AGW_E2E_A2A_SECRET": CLIENT_SECRET}
        gateway = stack.enter_context(
            start_process(gateway_args(config_path, port, database_url), port, env=env)
        )
        yield Setup(gateway, agents, data_dir_of(tmp) / "oauth-keys.json")


def gateway_verifier(setup: Setup) -> Any:
    """a2a-sdk's verifier, with the keys the gateway publishes at /oauth/jwks."""
    jwks = httpx.get(f"{setup.gateway.url}/oauth/jwks", timeout=TIMEOUT).json()

    def key_for(kid: str | None, _jku: str | None) -> PyJWK:
        return PyJWK.from_dict(next(k for k in jwks["keys"] if k["kid"] == kid))

    return create_signature_verifier(key_for, ["RS256"])


def send(setup: Setup, agent: str, token: str | None, text: str = "hi") -> httpx.Response:
    message = {
        "role": "ROLE_USER",
        "messageId": f"{text}-{uuid.uuid4().hex}",
        "parts": [{"text": text}],
        "metadata": {"skill": "echo"},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
    headers = {"a2a-version": "1.0", **({"authorization": f"Bearer {token}"} if token else {})}
    return httpx.post(setup.agent(agent), json=body, headers=headers, timeout=TIMEOUT)


def seen_by_agent(setup: Setup, text: str) -> dict[str, Any]:
    """The fixture's record of the message it received whose id starts with `text`."""
    return next(r for r in setup.received() if str(r.get("message_id", "")).startswith(f"{text}-"))


async def test_a_signed_upstream_card_verifies_and_the_gateways_card_verifies_against_its_jwks(
    setup: Setup,
) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        card = await A2ACardResolver(http, setup.agent("signed")).get_agent_card(
            signature_verifier=gateway_verifier(setup)
        )
    assert [s.id for s in card.skills] == ["echo", "shout"]
    assert all(i.url == setup.agent("signed") for i in card.supported_interfaces)
    assert len(card.signatures) == 1, "the agent's own signature is replaced by the gateway's"


def test_the_served_cards_signature_covers_the_card(setup: Setup) -> None:
    served = httpx.get(f"{setup.agent('signed')}/.well-known/agent-card.json", timeout=TIMEOUT).json()
    verify = gateway_verifier(setup)
    verify(read_card(served))
    served["skills"].append({"id": "forged", "name": "forged", "description": "x", "tags": ["x"]})
    with pytest.raises(InvalidSignaturesError):
        verify(read_card(served))


@pytest.mark.parametrize(
    ("agent", "why"),
    [
        ("tampered", "no signature on the agent card verifies"),
        ("wrongkey", "no signature on the agent card verifies"),
        ("unsigned", "carries no signature"),
    ],
)
def test_a_card_whose_signature_fails_is_refused_with_a_clear_error(
    setup: Setup, agent: str, why: str
) -> None:
    card = httpx.get(f"{setup.agent(agent)}/.well-known/agent-card.json", timeout=TIMEOUT)
    assert card.status_code == 502
    message = card.json()["error"]["message"]
    assert f"the agent card of {agent!r} was refused" in message and why in message
    before = len(setup.received())
    answer = send(setup, agent, None)
    assert "error" in answer.json() and "was refused" in answer.json()["error"]["message"]
    assert len(setup.received()) == before, "nothing reaches an agent whose card was refused"
    logged = [line for line in setup.gateway.output().splitlines() if "agent card refused" in line]
    assert any(why in line and "ERROR" in line for line in logged), "refusals are logged as errors"


def test_an_agent_with_token_exchange_gets_an_exchanged_token_never_the_callers(setup: Setup) -> None:
    token = setup.user_token("exchanged")
    answer = send(setup, "exchanged", token, text="xchg")
    assert "result" in answer.json(), answer.text
    upstream_token = seen_by_agent(setup, "xchg")["authorization"].removeprefix("Bearer ")
    assert upstream_token and upstream_token != token
    claims = jwt.decode(upstream_token, options={"verify_signature": False})
    assert claims["sub"] == "user:alice" or claims["sub"].endswith("alice")
    assert claims["aud"] in (f"{setup.agents}/echo", [f"{setup.agents}/echo"])
    assert claims["act"]["sub"] == "agentgw", "the agent sees the gateway acting for the user"


def test_an_anonymous_caller_cannot_reach_a_token_exchange_agent_but_may_read_its_card(setup: Setup) -> None:
    card = httpx.get(f"{setup.agent('exchanged')}/.well-known/agent-card.json", timeout=TIMEOUT)
    assert card.status_code == 200, card.text
    before = len(setup.received())
    answer = send(setup, "exchanged", None).json()
    assert "anonymous callers and API keys cannot be exchanged" in answer["error"]["message"]
    assert answer["error"]["code"] == -32603
    assert len(setup.received()) == before


def test_an_agent_with_client_credentials_gets_the_gateways_own_token(setup: Setup) -> None:
    token = setup.user_token("own")
    answer = send(setup, "own", token, text="own")
    assert "result" in answer.json(), answer.text
    sent = seen_by_agent(setup, "own")["authorization"].removeprefix("Bearer ")
    assert sent != token
    claims = jwt.decode(sent, options={"verify_signature": False})
    assert claims["sub"] != "user:alice" and "act" not in claims
