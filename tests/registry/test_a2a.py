"""A2A agent declarations, card reading, and the card cache (fetch, refresh, failure)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from agentgw.registry.a2a import (
    A2aAgentSpec,
    A2aRegistry,
    AgentInterface,
    CardUnavailable,
    UpstreamCard,
    card_interfaces,
    version_of,
)

CARD: dict[str, Any] = {
    "name": "a",
    "supportedInterfaces": [
        {"url": "http://a:1/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        {"url": "http://a:1/rest", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0", "tenant": "t"},
        {"url": "a:2", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
        {"url": "http://a:1/", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
        {"url": "http://a:1/", "protocolBinding": "JSONRPC", "protocolVersion": "2.0"},
    ],
    "skills": [{"id": "x"}, {"id": 3}, {"name": "no id"}, {"id": "y"}],
}


@pytest.mark.parametrize(
    ("value", "generation"),
    [
        (None, "0.3"),
        ("", "0.3"),
        ("0.3", "0.3"),
        ("0.3.0", "0.3"),
        ("1.0", "1.0"),
        ("1", "1.0"),
        ("1.1.2", "1.0"),
    ],
)
def test_versions_fold_into_two_generations(value: object, generation: str) -> None:
    assert version_of(value) == generation


@pytest.mark.parametrize("value", ["0.2.6", "2.0", "1.x", "v", 1.0])
def test_other_versions_are_unknown(value: object) -> None:
    assert version_of(value) is None


def test_a_card_yields_its_jsonrpc_and_http_json_interfaces_and_skill_ids() -> None:
    card = UpstreamCard.from_document(CARD)
    assert card.interfaces == (
        AgentInterface("http://a:1/", "JSONRPC", "1.0"),
        AgentInterface("http://a:1/rest", "HTTP+JSON", "1.0", "t"),
        AgentInterface("http://a:1/", "JSONRPC", "0.3"),
    )
    assert card.skills == ("x", "y")
    assert card.endpoint("JSONRPC", "0.3") == AgentInterface("http://a:1/", "JSONRPC", "0.3")
    assert card.endpoint("HTTP+JSON", "0.3") == AgentInterface("http://a:1/rest", "HTTP+JSON", "1.0", "t")
    assert (
        UpstreamCard.from_document({**CARD, "supportedInterfaces": CARD["supportedInterfaces"][:1]}).endpoint(
            "HTTP+JSON", "1.0"
        )
        is None
    )


def test_a_0_3_card_is_read_from_its_legacy_fields() -> None:
    legacy = {
        "url": "http://old:1",
        "preferredTransport": "HTTP+JSON",
        "protocolVersion": "0.3.0",
        "additionalInterfaces": [{"url": "http://old:1/rpc", "transport": "JSONRPC"}, "junk"],
    }
    assert card_interfaces(legacy) == [
        AgentInterface("http://old:1", "HTTP+JSON", "0.3"),
        AgentInterface("http://old:1/rpc", "JSONRPC", "0.3"),
    ]


@pytest.mark.parametrize(
    "document",
    [
        [],
        "card",
        {"name": "no interfaces"},
        {"supportedInterfaces": [{"url": "a:2", "protocolBinding": "GRPC"}]},
    ],
)
def test_a_card_without_a_usable_interface_is_unavailable(document: object) -> None:
    with pytest.raises(CardUnavailable):
        UpstreamCard.from_document(document)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"card_url": "http://a/card", "card": CARD},
        {"card_url": "ftp://a/card"},
        {"card": {"name": "useless"}},
        {"card": CARD, "credential": {"mode": "static"}},
        {"card": CARD, "credential": {"mode": "static", "env": "A"}},  # named, never located
        {"card": CARD, "credential": {"mode": "static", "file": "/x"}},
        {"card": CARD, "credential": {"mode": "none", "secret": "a"}},
        {"card": CARD, "credential": {"mode": "static", "secret": "a", "header": "bad header"}},
        {"card": CARD, "name": "Bad_Name"},
    ],
)
def test_bad_agent_declarations_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        A2aAgentSpec.model_validate({"name": "a", **fields})


async def _never(url: str, timeout_s: float) -> object:
    raise AssertionError("no fetch expected")


class Fetches:
    """A card source whose answers the test scripts; counts the fetches."""

    def __init__(self) -> None:
        self.answers: list[object] = []
        self.count = 0

    async def __call__(self, url: str, timeout_s: float) -> object:
        self.count += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_card_is_fetched_once_then_refreshed_when_stale_and_kept_while_a_refresh_fails() -> None:
    now = [0.0]
    fetches = Fetches()
    spec = A2aAgentSpec(name="a", card_url="http://a/card", card_refresh_s=60)
    registry = A2aRegistry([spec], fetches, clock=lambda: now[0])
    renamed = {**CARD, "skills": [{"id": "z"}]}
    fetches.answers = [CARD, RuntimeError("down"), renamed]
    assert (await registry.card(spec)).skills == ("x", "y")
    now[0] = 30
    assert (await registry.card(spec)).skills == ("x", "y") and fetches.count == 1
    now[0] = 61
    assert (await registry.card(spec)).skills == ("x", "y"), "a failed refresh keeps the last good card"
    now[0] = 65
    assert (await registry.card(spec)).skills == ("x", "y") and fetches.count == 2, "no retry at once"
    now[0] = 72
    assert (await registry.card(spec)).skills == ("z",)
    assert fetches.count == 3


async def test_a_card_never_fetched_is_unavailable_with_the_reason_and_not_retried_at_once() -> None:
    now = [0.0]
    fetches = Fetches()
    spec = A2aAgentSpec(name="a", card_url="http://a/card")
    registry = A2aRegistry([spec], fetches, clock=lambda: now[0])
    fetches.answers = [RuntimeError("http://a/card answered HTTP 500"), {"not": "a card"}, CARD]
    with pytest.raises(CardUnavailable, match=r"the agent card of 'a' could not be fetched: .*HTTP 500"):
        await registry.card(spec)
    with pytest.raises(CardUnavailable, match="HTTP 500"):
        await registry.card(spec)
    assert fetches.count == 1
    now[0] = 11
    with pytest.raises(CardUnavailable, match="no JSON-RPC or HTTP\\+JSON interface"):
        await registry.card(spec)
    now[0] = 22
    assert (await registry.card(spec)).skills == ("x", "y")


def test_disabled_and_unknown_agents_are_not_served() -> None:
    registry = A2aRegistry([A2aAgentSpec(name="off", card=CARD, enabled=False)], _never)
    assert registry.agent("off") is None and registry.agent("nope") is None
    assert registry.agents() == []
