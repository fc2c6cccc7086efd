"""Named secrets: where a secret may be sent, who may name it, and what is never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agentgw.registry.admission import Admission
from agentgw.registry.models import McpServerSpec
from agentgw.registry.secrets import SecretRefused, Secrets, SecretSource, SecretUnavailable, url_within


@pytest.mark.parametrize(
    ("url", "prefix", "within"),
    [
        ("https://a.example/v1/chat", "https://a.example/v1", True),
        ("https://a.example/v1", "https://a.example/v1/", True),
        ("https://a.example:443/x", "https://a.example/", True),
        ("https://A.example/x", "https://a.example/", True),
        ("https://a.example/v10", "https://a.example/v1", False),
        ("https://a.example.net/v1", "https://a.example", False),
        ("http://a.example/v1", "https://a.example/v1", False),
        ("https://a.example:8443/v1", "https://a.example/v1", False),
        ("https://evil.example/?u=https://a.example/v1", "https://a.example/v1", False),
    ],
)
def test_a_url_is_within_a_prefix_by_origin_and_whole_path_segments(
    url: str, prefix: str, within: bool
) -> None:
    assert url_within(url, prefix) is within


def test_who_may_name_a_secret_for_which_destination() -> None:
    secrets = Secrets(
        {"open": SecretSource(env="X", send_to=["https://a.example/mcp"]), "host-only": SecretSource(env="X")}
    )
    secrets.check("open", ["https://a.example/mcp"], from_config=False)
    secrets.check("host-only", ["https://anywhere.example/"], from_config=True)
    with pytest.raises(SecretRefused, match="may not be sent to"):
        secrets.check("open", ["https://b.example/mcp"], from_config=True)
    with pytest.raises(SecretRefused, match="config file only"):
        secrets.check("host-only", ["https://a.example/mcp"], from_config=False)
    with pytest.raises(SecretRefused, match="unknown secret"):
        secrets.check("nope", [], from_config=True)


def test_a_secret_source_is_one_of_env_or_file_and_never_a_gateway_setting() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        SecretSource(env="A", file=Path("/a"))
    with pytest.raises(ValidationError, match="gateway's own setting"):
        SecretSource(env="agentgw_database_url")
    with pytest.raises(ValidationError, match="gateway's own setting"):
        SecretSource(env="_AGENTGW_WORKER_SETTINGS")


def test_an_unreadable_secret_says_which_but_keeps_where_for_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SECRETS_TEST_UNSET", raising=False)
    secrets = Secrets({"gone": SecretSource(env="SECRETS_TEST_UNSET")})
    with pytest.raises(SecretUnavailable) as unavailable:
        secrets.read("gone")
    assert str(unavailable.value) == "secret 'gone' cannot be read"
    assert "SECRETS_TEST_UNSET" in unavailable.value.detail
    assert repr(Secrets({"k": SecretSource(env="HOME")}).read("k")) == "Secret('***')"


def test_stdio_outside_the_config_file_needs_an_allowed_command_line_and_no_env() -> None:
    admission = Admission(Secrets({}), [["/usr/bin/mcp-git", "--repo"]])

    def stdio(*argv: str, **extra: object) -> McpServerSpec:
        return McpServerSpec.model_validate(
            {"name": "s", "transport": "stdio", "command": argv[0], "args": list(argv[1:]), **extra}
        )

    assert admission.refusal(stdio("/usr/bin/mcp-git", "--repo", "/srv"), from_config=False) is None
    assert admission.refusal(stdio("/usr/bin/mcp-git"), from_config=False) is not None
    assert admission.refusal(stdio("/bin/sh", "-c", "id"), from_config=False) is not None
    assert admission.refusal(stdio("/usr/bin/mcp-git", "--repo", env={"PATH": "/tmp"}), from_config=False)
    assert admission.refusal(stdio("/bin/sh", "-c", "id"), from_config=True) is None
