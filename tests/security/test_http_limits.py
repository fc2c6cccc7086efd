"""What every request must be before any route sees it: one Host header (RFC 9112: 400 otherwise), on
the data plane and behind FastAPI's stack alike; and an admin API body within its limit (413 beyond,
declared or chunked)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.gateway import RunningGateway, run_gateway

PATHS = ["/mcp", "/mcp/demo", "/a2a/agent", "/v1/models", "/healthz", "/admin/policies"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "demo", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": ["p, user:root, admin:*, *, allow"]},
        "auth": {"builtin": {"enabled": True}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def status_line(gw: RunningGateway, request: bytes) -> bytes:
    address = urlsplit(gw.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("path", PATHS)
def test_a_request_with_two_host_headers_is_refused(gateway: RunningGateway, path: str) -> None:
    one = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    assert b" 400 " not in status_line(gateway, one) + b" "
    for second in ("127.0.0.1", "evil.example"):
        two = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: {second}\r\nConnection: close\r\n\r\n"
        assert status_line(gateway, two.encode()) == b"HTTP/1.1 400 Bad Request", (path, second)


def chunked(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 64 * 1024):
        yield body[start : start + 64 * 1024]


def test_an_admin_body_over_one_mebibyte_is_refused_declared_or_chunked(gateway: RunningGateway) -> None:
    url = f"{gateway.url}/admin/policies/check"
    headers = {"content-type": "application/json"}
    limit = 1024 * 1024
    assert httpx.post(url, content=b"x" * limit, headers=headers).status_code != 413
    declared = httpx.post(url, content=b"x" * (limit + 1), headers=headers)
    assert declared.status_code == 413
    assert str(limit) in declared.json()["detail"]
    streamed = httpx.post(url, content=chunked(b"x" * (limit + 1)), headers=headers)
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert streamed.status_code == 413


def test_the_admin_body_limit_is_a_setting(tmp_path: Path) -> None:
    config = {"policy": {"rules": ["p, user:root, admin:*, *, allow"]}, "admin_max_body_bytes": 4096}
    with run_gateway(tmp_path, config) as gw:
        url = f"{gw.url}/admin/policies/check"
        small = b'{"subject": "user:x", "object": "mcp:a/b", "action": "call"}'
        assert httpx.post(url, content=small, headers={"content-type": "application/json"}).status_code == 401
        big = b'{"subject": "' + b"x" * 8192 + b'", "object": "mcp:a/b", "action": "call"}'
        for content in (big, chunked(big)):
            refused = httpx.post(url, content=content, headers={"content-type": "application/json"})
            assert refused.status_code == 413
            assert "4096" in refused.json()["detail"]
