"""Registry specs refuse bad names, URLs and transport fields with a message naming the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentgw.registry.models import McpServerSpec, VirtualServerSpec, validate_name


@pytest.mark.parametrize("name", ["github", "a", "team-tools", "x1", "a" * 63])
def test_safe_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "GitHub",
        "a/b",
        "a*",
        "..",
        "a.b",
        "a:b",
        "a b",
        "-a",
        "a-",
        "a--b",
        "a__b",
        "gith\u0443b",
        "a" * 64,
    ],
)
def test_names_that_could_widen_a_pattern_or_fake_a_separator_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        validate_name(name)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "ftp://x/mcp"}, "absolute http"),
        ({"url": "/relative"}, "absolute http"),
        ({"url": "http://user:pw@x/mcp"}, "credentials in the URL"),
        ({"url": "http://x/mcp#frag"}, "fragment"),
        ({}, "needs a url"),
        ({"transport": "stdio", "url": "http://x"}, "needs a command"),
        ({"transport": "stdio", "command": "x", "url": "http://x"}, "not a url"),
        ({"url": "http://x", "command": "x"}, "not a command"),
        ({"url": "http://x", "timeout_s": 0}, "greater than 0"),
        ({"url": "http://x", "surprise": 1}, "Extra inputs"),
    ],
)
def test_each_bad_field_gets_a_clear_error(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        McpServerSpec.model_validate({"name": "s"} | fields)


def test_virtual_server_selectors_name_a_server_and_an_item() -> None:
    spec = VirtualServerSpec(name="v", tools=["github/*", "files/read"])
    assert spec.prefix is True
    for bad in (["github"], ["github/"], ["Git/x"], ["../x"]):
        with pytest.raises(ValidationError):
            VirtualServerSpec(name="v", tools=bad)
