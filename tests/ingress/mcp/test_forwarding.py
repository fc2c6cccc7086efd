"""Forwarding a bridged session's request to the node that holds it: which URLs a node may have,
which requests go elsewhere, and an owner that is gone or silent (a lost session, never a hang)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from agentgw.errors import ConfigError, SessionNotFound
from agentgw.ingress.mcp.forwarding import FORWARDED_HEADER, Forwarder, node_url_error
from agentgw.settings import load_settings
from conformance.fixtures.launch import free_port


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://10.20.0.7:80", "https://192.168.1.2:8443", "http://[::1]:8080"]
)
def test_a_loopback_or_private_address_can_be_a_node_url(url: str) -> None:
    assert node_url_error(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://gateway-1.internal:8080",  # a name: it could resolve anywhere
        "http://8.8.8.8:80",  # public
        "http://0.0.0.0:8080",  # every address, no one node
        "http://127.0.0.1",  # no port
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:8080/mcp",
        "http://user:secret@127.0.0.1:8080",
        "http://127.0.0.1:99999",
        "127.0.0.1:8080",
        "http://169.254.169.254:80",  # link-local: where cloud metadata services answer
        "http://[fe80::1]:80",
        "http://[::ffff:169.254.169.254]:80",  # the same, IPv4-mapped
        "http://[::ffff:8.8.8.8]:80",
    ],
)
def test_anything_else_cannot(url: str) -> None:
    assert node_url_error(url) is not None


def test_a_node_url_is_configured_or_derived_from_a_private_bind_address(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"data_dir: {tmp_path / 'state'}\n")
    assert load_settings(config, host="127.0.0.1", port=8123).own_node_url() == "http://127.0.0.1:8123"
    assert load_settings(config, host="0.0.0.0", port=8123).own_node_url() is None
    configured = load_settings(config, host="0.0.0.0", node_url="http://10.0.0.5:8080/")
    assert configured.own_node_url() == "http://10.0.0.5:8080"
    with pytest.raises(ConfigError, match="node_url"):
        load_settings(config, node_url="http://attacker.example:80")


def test_only_another_nodes_session_not_yet_forwarded_goes_elsewhere() -> None:
    forwarder = Forwarder("http://127.0.0.1:8001", wait_s=1, max_body_bytes=1024)
    other = "http://127.0.0.1:8002"
    assert forwarder.elsewhere(other, {})
    assert not forwarder.elsewhere("http://127.0.0.1:8001", {})
    # Forwarded once already, whatever the header says: served where it arrived, never sent on.
    assert not forwarder.elsewhere(other, {FORWARDED_HEADER: "anything"})
    # A binding that names no node (the session id itself: a node without a node URL bound it).
    assert not forwarder.elsewhere("3f2a9c", {})
    # Nor one that names an address no node may have: a caller's credentials would go there.
    assert not forwarder.elsewhere("http://8.8.8.8:80", {})


def _request(method: str = "POST") -> tuple[dict[str, Any], Any, Any, list[Message]]:
    scope = {"type": "http", "method": method, "path": "/mcp", "query_string": b"", "headers": []}
    sent: list[Message] = []

    pending = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client stays: no disconnect comes
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    return scope, receive, send, sent


async def _forward_to(owner: str, wait_s: float) -> tuple[bool, list[Message], BaseException | None]:
    forwarder = Forwarder("http://127.0.0.1:1", wait_s=wait_s, max_body_bytes=1024)
    dropped = False

    async def lost() -> None:
        nonlocal dropped
        dropped = True

    scope, receive, send, sent = _request()
    headers = {"content-type": "application/json", "mcp-session-id": "s1"}
    error: BaseException | None = None
    try:
        await forwarder.forward(owner, scope, receive, send, headers, lost=lost)
    except SessionNotFound as exc:
        error = exc
    finally:
        await forwarder.aclose()
    return dropped, sent, error


async def test_an_owner_that_refuses_connections_is_a_lost_session() -> None:
    dropped, sent, error = await _forward_to(f"http://127.0.0.1:{free_port()}", wait_s=5)
    assert isinstance(error, SessionNotFound) and error.http_status == 404
    assert dropped and sent == []


@pytest.fixture
async def silent_owner() -> AsyncIterator[str]:
    """A node that accepts connections and never answers (hung)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_an_owner_that_never_answers_is_a_lost_session_not_a_hang(silent_owner: str) -> None:
    dropped, sent, error = await asyncio.wait_for(_forward_to(silent_owner, wait_s=0.5), timeout=30)
    assert isinstance(error, SessionNotFound)
    assert dropped and sent == []


@pytest.fixture
async def restarted_owner() -> AsyncIterator[str]:
    """A node that answers 404 to everything: it holds no session (restarted at the same URL)."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def test_an_owner_that_no_longer_holds_the_session_answers_and_its_binding_is_dropped(
    restarted_owner: str,
) -> None:
    dropped, sent, error = await _forward_to(restarted_owner, wait_s=5)
    assert error is None and dropped
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 404


@pytest.fixture
async def recording_owner() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A node that records each request it gets and answers with a small SSE body."""
    received: list[bytes] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        received.append(head + await reader.readexactly(length))
        body = b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nmcp-session-id: s1\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", received
    server.close()
    await server.wait_closed()


async def test_the_request_goes_to_the_owner_with_its_credentials_marked_forwarded(
    recording_owner: tuple[str, list[bytes]],
) -> None:
    owner, received = recording_owner
    forwarder = Forwarder("http://127.0.0.1:1", wait_s=5, max_body_bytes=1024)
    scope, receive, send, sent = _request()
    scope["query_string"] = b"session_id=abc"
    headers = {
        "host": "gateway.example.com",
        "authorization": "Bearer caller-token",
        "content-type": "application/json",
        "mcp-session-id": "s1",
        "connection": "keep-alive, x-private",
        FORWARDED_HEADER: "a caller's own value",
    }

    async def never() -> None:
        raise AssertionError("the session is not lost")

    try:
        await forwarder.forward(owner, scope, receive, send, headers, lost=never)
    finally:
        await forwarder.aclose()
    [request] = received
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0] == "post /mcp?session_id=abc http/1.1"
    assert "authorization: bearer caller-token" in lines
    assert "host: gateway.example.com" in lines  # the owner answers to the names this node does
    assert f"{FORWARDED_HEADER}: http://127.0.0.1:1" in lines  # this node's mark, not the caller's
    assert not any(line.startswith("connection: keep-alive, x-private") for line in lines)
    assert body == b"{}"
    assert sent[0]["status"] == 200
    assert (b"mcp-session-id", b"s1") in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]).startswith(b"data: ")
