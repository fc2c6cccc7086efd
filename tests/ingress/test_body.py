from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from agentgw.errors import PayloadTooLarge, UnsupportedMediaType
from agentgw.ingress.body import read_body_asgi

JSON = {"content-type": "application/json"}


class _Client:
    """An ASGI `receive` that plays `messages` and keeps what was not asked for."""

    def __init__(self, messages: Iterable[dict[str, Any]]) -> None:
        self.pending = list(messages)

    async def __call__(self) -> dict[str, Any]:
        return self.pending.pop(0)


def _read(headers: dict[str, str], messages: Iterable[dict[str, Any]], limit: int = 10) -> bytes:
    return asyncio.run(read_body_asgi(headers, _Client(messages), limit))


def test_a_body_in_one_message_is_read() -> None:
    assert _read(JSON, [{"type": "http.request", "body": b"{}"}]) == b"{}"


def test_a_body_in_several_messages_is_joined() -> None:
    messages = [
        {"type": "http.request", "body": b"[1,", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"2]", "more_body": False},
    ]
    assert _read(JSON, messages) == b"[1,2]"


def test_a_media_type_with_parameters_is_json() -> None:
    headers = {"content-type": "Application/JSON; charset=utf-8"}
    assert _read(headers, [{"type": "http.request", "body": b"{}"}]) == b"{}"


def test_another_media_type_is_refused_before_the_body_is_read() -> None:
    receive = _Client([{"type": "http.request", "body": b"{}"}])
    with pytest.raises(UnsupportedMediaType):
        asyncio.run(read_body_asgi({"content-type": "text/plain"}, receive, 10))
    assert receive.pending, "the body was not read"


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    receive = _Client([{"type": "http.request", "body": b"{}"}])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body_asgi({**JSON, "content-length": "11"}, receive, 10))
    assert receive.pending, "the body was not read"


@pytest.mark.parametrize(
    "messages",
    [
        [{"type": "http.request", "body": b"x" * 11}],
        [
            {"type": "http.request", "body": b"x" * 6, "more_body": True},
            {"type": "http.request", "body": b"x" * 5},
        ],
    ],
    ids=["one message", "several messages"],
)
def test_a_body_over_the_limit_is_refused_whatever_length_it_declared(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(PayloadTooLarge):
        _read({**JSON, "content-length": "2"}, messages)


def test_a_body_of_exactly_the_limit_is_read() -> None:
    assert _read(JSON, [{"type": "http.request", "body": b"x" * 10}]) == b"x" * 10


def test_a_client_that_goes_away_mid_body_is_a_disconnect() -> None:
    messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    with pytest.raises(ClientDisconnect):
        _read(JSON, messages)


def test_a_client_that_goes_away_before_the_body_is_a_disconnect() -> None:
    with pytest.raises(ClientDisconnect):
        _read(JSON, [{"type": "http.disconnect"}])
