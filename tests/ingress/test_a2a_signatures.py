"""Agent card signatures in process: upstream verification against configured keys, the gateway's signer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.utils.signing import create_signature_verifier
from jwt import PyJWK

from agentgw.call import Call, Reply
from agentgw.errors import ConfigError
from agentgw.filters.credentials import Credentials, TokenService
from agentgw.ingress.a2a.signatures import CardSigner, UpstreamCardVerifier, card_signer, read_card
from agentgw.oauth.keys import SigningKeys
from agentgw.registry.a2a import A2aAgentSpec, A2aRegistry, CardSignatureInvalid, CardUnavailable
from agentgw.registry.secrets import Secrets, SecretSource
from conformance.fixtures.a2a_agents import CardKeys, agent_card

CARD_URL = "http://agent.test/echo/.well-known/agent-card.json"


@pytest.fixture(scope="module")
def keys() -> CardKeys:
    return CardKeys()


def spec(card_keys: dict[str, Any] | None = None, **extra: Any) -> A2aAgentSpec:
    return A2aAgentSpec.model_validate(
        {"name": "echo", "card_url": CARD_URL, "card_keys": card_keys, **extra}
    )


async def no_fetch(url: str, timeout_s: float) -> object:
    raise AssertionError(f"nothing should be fetched, yet {url} was")


def signed_card(keys: CardKeys, *, other: bool = False) -> dict[str, Any]:
    return agent_card_to_dict(keys.signed(agent_card("echo", "http://agent.test/echo/"), other=other))


async def test_a_card_signed_by_a_configured_key_verifies(keys: CardKeys) -> None:
    await UpstreamCardVerifier(no_fetch)(spec({"jwks": keys.jwks()}), signed_card(keys))


async def test_a_card_signed_by_another_key_or_changed_after_signing_is_refused(keys: CardKeys) -> None:
    verify = UpstreamCardVerifier(no_fetch)
    with pytest.raises(CardSignatureInvalid, match="no signature on the agent card verifies"):
        await verify(spec({"jwks": keys.jwks()}), signed_card(keys, other=True))
    changed = signed_card(keys)
    changed["skills"][0]["description"] = "changed in transit"
    with pytest.raises(CardSignatureInvalid, match="no signature on the agent card verifies"):
        await verify(spec({"jwks": keys.jwks()}), changed)


async def test_an_unsigned_card_is_refused_unless_signatures_are_optional(keys: CardKeys) -> None:
    unsigned = agent_card_to_dict(agent_card("echo", "http://agent.test/echo/"))
    verify = UpstreamCardVerifier(no_fetch)
    with pytest.raises(CardSignatureInvalid, match="carries no signature"):
        await verify(spec({"jwks": keys.jwks()}), unsigned)
    await verify(spec({"jwks": keys.jwks(), "required": False}), unsigned)


async def test_without_card_keys_signatures_are_not_checked_and_that_is_logged(
    keys: CardKeys, caplog: pytest.LogCaptureFixture
) -> None:
    await UpstreamCardVerifier(no_fetch)(spec(), signed_card(keys, other=True))
    assert "no card_keys are configured" in caplog.text


async def test_the_keys_come_from_jwks_uri_and_a_failed_fetch_refuses_the_card(keys: CardKeys) -> None:
    seen: list[str] = []

    async def fetch(url: str, timeout_s: float) -> object:
        seen.append(url)
        return keys.jwks()

    async def down(url: str, timeout_s: float) -> object:
        raise OSError("connection refused")

    jwks_uri = {"jwks_uri": "http://agent.test/jwks"}
    await UpstreamCardVerifier(fetch)(spec(jwks_uri), signed_card(keys))
    assert seen == ["http://agent.test/jwks"]
    with pytest.raises(CardSignatureInvalid, match="could not be fetched"):
        await UpstreamCardVerifier(down)(spec(jwks_uri), signed_card(keys))


async def test_garbage_keys_refuse_the_card(keys: CardKeys) -> None:
    async def fetch(url: str, timeout_s: float) -> object:
        return ["not", "a", "jwks"]

    with pytest.raises(CardSignatureInvalid, match="not a usable JWK set"):
        await UpstreamCardVerifier(fetch)(spec({"jwks_uri": "http://agent.test/jwks"}), signed_card(keys))


def test_card_keys_need_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one of jwks_uri and jwks"):
        spec({})
    with pytest.raises(ValueError, match="HS256"):
        spec({"jwks": {"keys": []}, "algorithms": ["HS256"]})


async def test_a_refused_refresh_keeps_the_card_verified_before(keys: CardKeys) -> None:
    now = [0.0]
    answers = [signed_card(keys), signed_card(keys, other=True)]

    async def fetch(url: str, timeout_s: float) -> object:
        return answers.pop(0)

    agent = spec({"jwks": keys.jwks()}, card_refresh_s=10)
    registry = A2aRegistry([agent], fetch, clock=lambda: now[0], verify=UpstreamCardVerifier(no_fetch))
    first = await registry.card(agent)
    now[0] = 100.0
    assert await registry.card(agent) is first


async def test_a_card_never_verified_is_unavailable_with_the_reason(keys: CardKeys) -> None:
    async def fetch(url: str, timeout_s: float) -> object:
        return signed_card(keys, other=True)

    agent = spec({"jwks": keys.jwks()})
    registry = A2aRegistry([agent], fetch, verify=UpstreamCardVerifier(no_fetch))
    with pytest.raises(CardUnavailable, match="the agent card of 'echo' was refused: no signature"):
        await registry.card(agent)


def test_the_gateways_signature_verifies_with_its_published_key_and_covers_the_card(tmp_path: Path) -> None:
    signing = SigningKeys(tmp_path / "keys.json")
    signer = CardSigner(signing, "http://gw.test/oauth/jwks")
    card = agent_card_to_dict(agent_card("echo", "http://gw.test/a2a/echo"))
    served = signer.sign({**card, "signatures": [{"protected": "old", "signature": "old"}]})
    assert len(served["signatures"]) == 1

    def key_for(kid: str | None, jku: str | None) -> PyJWK:
        assert jku == "http://gw.test/oauth/jwks"
        return PyJWK.from_dict(next(k for k in signing.jwks()["keys"] if k["kid"] == kid))

    verify = create_signature_verifier(key_for, ["RS256"])
    verify(read_card(served))
    assert signer.sign(card) == served, "the same card is signed once"
    served["name"] = "someone else"
    with pytest.raises(Exception, match="No valid signature"):
        verify(read_card(served))


def test_card_signing_is_on_with_the_builtin_server_and_refused_without_it(tmp_path: Path) -> None:
    signing = SigningKeys(tmp_path / "keys.json")
    assert card_signer(None, signing, "http://gw.test") is not None
    assert card_signer(False, signing, "http://gw.test") is None
    assert card_signer(None, None, "http://gw.test") is None
    with pytest.raises(ConfigError, match="needs the built-in authorization server"):
        card_signer(True, None, "http://gw.test")


def test_a2a_agents_are_named_apart_from_mcp_servers() -> None:
    client = {"client_id": "gw", "secret": "not-read-here"}
    agent = spec(credential={"mode": "client_credentials", "client": client})
    upstream = agent.credentialed()
    assert upstream.name == "a2a:echo"
    assert upstream.url == "http://agent.test/echo", "the card URL without its well-known path"
    assert spec(credential={"mode": "static", "secret": "x"}).credentialed().name == "a2a:echo"
    with pytest.raises(ConfigError):
        Credentials().prepare([upstream])  # its client secret is not set: start-up stops


async def test_the_credentials_stage_serves_an_agents_token_mode_but_not_its_public_card(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("A2A_TEST_SECRET", "s3cret")
    grants: list[bytes] = []

    def token_endpoint(request: httpx.Request) -> httpx.Response:
        grants.append(request.content)
        return httpx.Response(
            200, json={"access_token": "agent-token", "token_type": "Bearer", "expires_in": 300}
        )

    http = httpx.AsyncClient(transport=httpx.MockTransport(token_endpoint))
    client = {"client_id": "gw", "secret": "a2a-secret"}
    upstream = spec(credential={"mode": "client_credentials", "client": client}).credentialed()
    stage = Credentials(
        agents={"echo": upstream}.get,
        builtin=TokenService("http://gw.test/oauth/token", http),
        secrets=Secrets({"a2a-secret": SecretSource(env="A2A_TEST_SECRET")}),
    )
    seen: list[str | None] = []

    async def terminal(call: Call) -> Reply:
        seen.append(call.upstream_authorization)
        return Reply()

    def call(method: str, resource: str, *, reaches_upstream: bool = True) -> Call:
        return Call(
            protocol="a2a",
            action="send",
            resource=resource,
            upstream="echo",
            method=method,
            reaches_upstream=reaches_upstream,
            upstream_authorization="Bearer the-callers-token",
        )

    await stage(call("SendMessage", "a2a:echo/echo"), terminal)
    await stage(call("GetAgentCard", "a2a:echo", reaches_upstream=False), terminal)  # as the ingress sets it
    await stage(
        Call(protocol="mcp", action="call", resource="mcp:echo/x", upstream="echo", method="x"), terminal
    )
    await stage.aclose()
    assert seen == ["Bearer agent-token", None, None], "the MCP server named echo is another upstream"
    assert len(grants) == 1 and b"resource=http%3A%2F%2Fagent.test%2Fecho" in grants[0]
