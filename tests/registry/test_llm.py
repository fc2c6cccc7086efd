"""LLM route specs: validation, credentials in the credentials stage's terms, fallback chains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agentgw.errors import ConfigError
from agentgw.registry.llm import LlmRoute, LlmRoutes, LlmRouteSpec, check_routes, token_upstreams
from agentgw.registry.models import UpstreamClientCredentials, UpstreamStatic, UpstreamTokenExchange
from agentgw.settings import load_settings

BASE = {"base_url": "https://llm.example/v1", "model": "gpt-4o-mini"}


def spec(name: str, **extra: Any) -> LlmRouteSpec:
    return LlmRouteSpec.model_validate({"name": name, **BASE, **extra})


@pytest.mark.parametrize("name", ["gpt-4.1", "fast", "a", "llama-3.1-8b", "x" * 64])
def test_model_names_may_have_dots_and_hyphens(name: str) -> None:
    assert spec(name).name == name


@pytest.mark.parametrize(
    "name", ["", "GPT", "a/b", "a*", "llm:x", "a b", "-a", "a.", "a..b", "a--b", "x" * 65, "a_b"]
)
def test_model_names_that_could_widen_a_policy_pattern_or_fake_a_separator_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid model name"):
        spec(name)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"base_url": "ftp://x/v1"}, "absolute http"),
        ({"base_url": "https://user:pw@x/v1"}, "credentials in the URL"),
        ({"model": "has space"}, "provider model id"),
        ({"input_price": -1}, "greater than or equal"),
        ({"timeout_s": 0}, "greater than"),
        ({"fallbacks": ["self"]}, "its own fallback"),
        ({"fallbacks": ["b", "b"]}, "twice"),
        ({"credential": {"mode": "static"}}, "secret"),
        ({"credential": {"mode": "static", "env": "K"}}, "never an environment variable or a file"),
        ({"credential": {"mode": "static", "file": "/k"}}, "never an environment variable or a file"),
        ({"credential": {"mode": "static", "secret": "NOT_A_NAME"}}, "invalid name"),
        ({"credential": {"mode": "static", "secret": "k", "value": "sk-inline"}}, "Extra inputs"),
        ({"credential": {"mode": "client_credentials", "secret": "k"}}, "token_url"),
        ({"credential": {"mode": "magic"}}, "does not match any of the expected tags"),
        ({"provider": "anthropic"}, "openai"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_a_bad_route_spec_is_refused_with_the_reason(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        spec("self", **extra)


def test_routes_must_have_unique_names_and_declared_fallbacks() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        check_routes([spec("a"), spec("a")])
    with pytest.raises(ValueError, match="undeclared route 'ghost'"):
        check_routes([spec("a", fallbacks=["ghost"])])


def test_each_credential_mode_becomes_the_credentials_stages_own() -> None:
    assert spec("a").token_upstream() is None
    static = spec("a", credential={"mode": "static", "secret": "llm-key"}).token_upstream()
    assert static is not None and static.name == "llm:a" and static.url == BASE["base_url"]
    assert static.credential == UpstreamStatic(mode="static", secret="llm-key")
    granted = spec(
        "a",
        credential={
            "mode": "client_credentials",
            "token_url": "https://idp.example/token",
            "client_id": "gw",
            "secret": "cc",
            "scope": "llm.read llm.write",
        },
    ).token_upstream()
    assert granted is not None and granted.url is None  # the route's grant names no resource
    assert isinstance(granted.credential, UpstreamClientCredentials)
    assert granted.credential.token_url == "https://idp.example/token"
    assert (granted.credential.client.client_id, granted.credential.client.secret) == ("gw", "cc")
    assert granted.credential.client.method == "client_secret_basic"
    assert granted.credential.scopes == ["llm.read", "llm.write"]
    exchange = {"mode": "token_exchange", "client": {"client_id": "gw", "secret": "cc"}, "scopes": ["x"]}
    exchanged = spec("a", credential=exchange).token_upstream()
    assert exchanged is not None and exchanged.url == BASE["base_url"]
    assert isinstance(exchanged.credential, UpstreamTokenExchange) and exchanged.credential.scopes == ["x"]


def test_only_enabled_routes_with_a_credential_are_the_stages_to_serve() -> None:
    # A disabled route's secret is never read: an unset one must not stop start-up.
    static = {"mode": "static", "secret": "unset"}
    served = token_upstreams(
        [spec("a", credential=static), spec("b"), spec("off", enabled=False, credential=static)]
    )
    assert list(served) == ["a"] and served["a"].name == "llm:a"


def test_a_disabled_route_is_unknown_and_skipped_as_a_fallback() -> None:
    routes = LlmRoutes.load([spec("a", fallbacks=["off", "b"]), spec("b"), spec("off", enabled=False)])
    assert routes.names() == ["a", "b"]
    assert routes.get("off") is None and routes.chain("off") == []
    assert [r.name for r in routes.chain("a")] == ["a", "b"]
    assert routes.chain("nope") == []


def test_cost_is_per_million_tokens_at_the_input_and_output_prices() -> None:
    route = LlmRoute(spec("a", input_price=0.15, output_price=0.6))
    assert route.cost(1_000_000, 0) == pytest.approx(0.15)
    assert route.cost(2000, 500) == pytest.approx((2000 * 0.15 + 500 * 0.6) / 1e6)


def test_the_config_file_declares_llm_routes(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "llm_routes:\n"
        "  - {name: fast, base_url: 'https://llm.example/v1', model: m, fallbacks: [slow]}\n"
        "  - {name: slow, base_url: 'https://llm.example/v1', model: n}\n"
    )
    settings = load_settings(config)
    assert [r.name for r in settings.llm_routes] == ["fast", "slow"]
    config.write_text(
        "llm_routes:\n  - {name: fast, base_url: 'https://x/v1', model: m, fallbacks: [gone]}\n"
    )
    with pytest.raises(ConfigError, match="undeclared route 'gone'"):
        load_settings(config)
