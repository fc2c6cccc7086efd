"""LLM route specs: validation, secrets read once and never shown, fallback chains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agentgw.errors import ConfigError
from agentgw.registry.llm import LlmRoute, LlmRouteError, LlmRoutes, LlmRouteSpec, check_routes
from agentgw.registry.secrets import Secrets, SecretSource
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


def test_a_static_secret_is_read_from_the_environment_once_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_TEST_KEY", "sk-very-secret")
    secrets = Secrets({"llm-key": SecretSource(env="LLM_TEST_KEY")})
    route = LlmRoute.load(spec("a", credential={"mode": "static", "secret": "llm-key"}), secrets)
    monkeypatch.setenv("LLM_TEST_KEY", "changed")
    assert route.secret is not None and route.secret.reveal() == "sk-very-secret"
    assert "sk-very-secret" not in repr(route) + str(route.secret)
    assert "sk-very-secret" not in route.spec.model_dump_json()


def test_a_secret_file_is_read_and_stripped_and_a_missing_or_empty_one_names_the_problem(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    (tmp_path / "empty").write_text("\n")
    secrets = Secrets(
        {
            "key": SecretSource(file=key),
            "absent": SecretSource(file=tmp_path / "absent"),
            "empty": SecretSource(file=tmp_path / "empty"),
        }
    )
    route = LlmRoute.load(spec("a", credential={"mode": "static", "secret": "key"}), secrets)
    assert route.secret is not None and route.secret.reveal() == "sk-from-file"
    with pytest.raises(LlmRouteError, match=r"secret 'absent' cannot be read \(cannot read file"):
        LlmRoute.load(spec("a", credential={"mode": "static", "secret": "absent"}), secrets)
    with pytest.raises(LlmRouteError, match="is empty"):
        LlmRoute.load(spec("a", credential={"mode": "static", "secret": "empty"}), secrets)
    with pytest.raises(LlmRouteError, match="unknown secret 'nope'"):
        LlmRoute.load(spec("a", credential={"mode": "static", "secret": "nope"}), secrets)


def test_a_disabled_route_is_unknown_and_skipped_as_a_fallback() -> None:
    routes = LlmRoutes.load(
        [spec("a", fallbacks=["off", "b"]), spec("b"), spec("off", enabled=False, credential=_unset_env())],
        Secrets({"unset": SecretSource(env="LLM_TEST_SURELY_UNSET")}),
    )
    assert routes.names() == ["a", "b"]
    assert routes.get("off") is None and routes.chain("off") == []
    assert [r.name for r in routes.chain("a")] == ["a", "b"]
    assert routes.chain("nope") == []


def _unset_env() -> dict[str, str]:
    # A disabled route's secret is not read: an unset variable must not stop start-up.
    return {"mode": "static", "secret": "unset"}


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
