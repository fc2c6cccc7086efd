"""Parsing, header checks and classification of MCP messages into policy objects."""

from __future__ import annotations

import pytest

from agentgw.errors import BadRequest, HeaderMismatch, ParseError
from agentgw.ingress.mcp.messages import classify, item_object, parse


def msg(body: bytes, **headers: str) -> tuple[str, str]:
    return classify("gh", parse(body, headers))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}',
            ("call", "mcp:gh/search"),
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}',
            ("call", "mcp:gh/prompt/p"),
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}',
            ("read", "mcp:gh/resource/file:///a"),
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri":"x://y"}}',
            ("read", "mcp:gh/resource/x://y"),
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', ("list", "mcp:gh")),
        (b'{"jsonrpc":"2.0","id":1,"method":"resources/templates/list"}', ("list", "mcp:gh")),
        (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', ("session", "mcp:gh")),
        (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', ("session", "mcp:gh")),
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', ("session", "mcp:gh")),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"p"}}}',
            ("call", "mcp:gh/prompt/p"),
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"t://{x}"}}}',
            ("read", "mcp:gh/resource/t://{x}"),
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{}}', ("call", "mcp:gh/method/tasks%2Fget")),
    ],
)
def test_each_method_becomes_its_action_and_object(body: bytes, expected: tuple[str, str]) -> None:
    assert msg(body) == expected


@pytest.mark.parametrize(
    ("name", "obj"),
    [
        ("a/b", "mcp:gh/a%2Fb"),
        ("prompt/x", "mcp:gh/prompt%2Fx"),  # can never become the prompt x
        ("*", "mcp:gh/%2A"),
        ("..", "mcp:gh/.."),
        ("se\u0430rch", "mcp:gh/se%D0%B0rch"),  # a Cyrillic a is not the tool search
        ("x__y", "mcp:gh/x__y"),
        (7, "mcp:gh/"),
    ],
)
def test_odd_tool_names_cannot_reach_into_another_object(name: object, obj: str) -> None:
    assert item_object("gh", "tools", {"name": name}) == obj


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", ParseError),
        (b"", ParseError),
        (b"[]", BadRequest),
        (b'"x"', BadRequest),
        (b'{"jsonrpc":"2.0"}', BadRequest),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', BadRequest),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', BadRequest),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', BadRequest),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}', BadRequest),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', BadRequest),
    ],
)
def test_malformed_messages_are_refused(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(body, {})


CALL = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"search","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}'
)


@pytest.mark.parametrize(
    "headers",
    [
        {"mcp-method": "tools/list"},
        {"mcp-name": "other"},
        {"mcp-name": "=?base64?b3RoZXI=?="},  # "other"
        {"mcp-name": "=?base64?not base64?="},
        {"mcp-protocol-version": "2025-11-25"},
    ],
)
def test_headers_that_disagree_with_the_body_are_refused_before_any_decision(headers: dict[str, str]) -> None:
    with pytest.raises(HeaderMismatch):
        parse(CALL, headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"mcp-method": "tools/call", "mcp-name": "search", "mcp-protocol-version": "2026-07-28"},
        {"mcp-name": "  search\t"},
        {"mcp-name": "=?base64?c2VhcmNo?="},  # "search"
    ],
)
def test_headers_that_agree_with_the_body_pass(headers: dict[str, str]) -> None:
    assert classify("gh", parse(CALL, headers)) == ("call", "mcp:gh/search")
