"""Upstreams that are slow, down, or answer garbage give the client a clear JSON-RPC error."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.support.gateway import RunningGateway, run_gateway

CALL = b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}'
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


class _Garbage(socketserver.BaseRequestHandler):
    """Answers every request with 200 and a body that is not JSON-RPC."""

    def handle(self) -> None:
        self.request.recv(65536)
        body = b"not json"
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )


@pytest.fixture(scope="module")
def garbage_url() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mcp"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, modern_upstream: str, garbage_url: str
) -> Iterator[RunningGateway]:
    config = {
        "allow_anonymous": True,
        "list_timeout_s": 1,
        "servers": [
            {"name": "slowpoke", "url": f"{modern_upstream}/mcp", "timeout_s": 1},
            {"name": "garbage", "url": garbage_url, "timeout_s": 2},
            {"name": "down", "url": "http://127.0.0.1:9/mcp", "timeout_s": 2},
        ],
        "virtual_servers": [{"name": "slow-bridged", "tools": ["slowpoke/*"]}],
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow"]},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def call(gateway: RunningGateway, server: str, body: bytes = CALL) -> dict[str, object]:
    response = httpx.post(gateway.mcp(server), content=body, headers=HEADERS, timeout=10)
    assert response.status_code == 200, response.text
    payload: dict[str, object] = response.json()
    return payload


async def test_a_slow_upstream_times_out_with_a_clear_error(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp("slowpoke"), mode="2026-07-28") as client:
        with pytest.raises(MCPError, match=r"^upstream 'slowpoke' did not answer within 1s$"):
            await client.call_tool("slow", {"seconds": 5})


def test_an_upstream_answering_garbage_gives_a_clear_error(gateway: RunningGateway) -> None:
    answer = call(gateway, "garbage")
    assert answer["error"] == {
        "code": -32603,
        "message": "upstream 'garbage' answered with something that is not a JSON-RPC response",
    }


def test_an_upstream_that_is_down_gives_a_clear_error(gateway: RunningGateway) -> None:
    answer = call(gateway, "down")
    assert answer["error"] == {"code": -32603, "message": "upstream 'down' is unreachable"}


async def test_the_merged_list_leaves_out_upstreams_that_are_down_or_broken(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "slowpoke__echo" in names
    assert not any(n.startswith(("garbage__", "down__")) for n in names)
    assert "upstream garbage left out of tools/list" in gateway.output() or "garbage" in gateway.output()


async def test_a_slow_call_through_the_bridge_times_out_with_a_clear_error(gateway: RunningGateway) -> None:
    async with Client(gateway.mcp("slow-bridged"), mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="did not answer within 1s"):
            await client.call_tool("slowpoke__slow", {"seconds": 5})
        # ... and the upstream is still usable afterwards.
        result = await client.call_tool("slowpoke__echo", {"text": "still here"})
        assert result.content[0].text == "still here"  # type: ignore[union-attr]


def test_a_config_with_a_bad_server_refuses_to_start_and_says_which_field(tmp_path: Path) -> None:
    config = {"servers": [{"name": "Bad/Name", "url": "ftp://x"}], "policy": {"allow_empty": True}}
    with pytest.raises(Exception, match="invalid name") as info, run_gateway(tmp_path, config):
        pass
    assert "invalid url" in str(info.value)
