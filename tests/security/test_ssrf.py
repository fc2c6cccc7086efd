"""An unauthenticated caller cannot make the gateway reach internal addresses.

The attack: `GET /oauth/authorize?client_id=https://127.0.0.1:<port>/...` made the gateway connect
there to fetch a Client ID Metadata Document (and the answer's timing mapped open ports). Every
caller-chosen fetch goes through agentgw/fetch_guard.py: non-public addresses are refused before any
connection unless `fetch_allow` lists them, the connection goes to the address checked, no redirects,
small limits, and the caller is told why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from agentgw.fetch_guard import FetchGuard, FetchRefused
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import gateway_args, run_gateway, write_config
from tests.support.servers import Answer, LocalServer, Received, Scripted, tls_ca

REDIRECT = "http://127.0.0.1:9999/cb"
POLICY = {"rules": ["p, role:dev, mcp:*, *, allow"]}


class Trap:
    """A listening socket nobody accepts on: any connection the gateway makes waits in its backlog."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family)
        self.socket.bind((host, port))
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.socket.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


def authorize_params(client_id: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "state": "st",
        "code_challenge": "x" * 43,
        "code_challenge_method": "S256",
    }


def authorize(base: str, client_id: str) -> httpx.Response:
    return httpx.get(f"{base}/oauth/authorize", params=authorize_params(client_id), timeout=30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FixtureProcess]:
    with run_gateway(tmp_path_factory.mktemp("ssrf"), {"policy": POLICY}) as running:
        yield running.process


@pytest.fixture(scope="module")
def traps() -> Iterator[dict[str, Trap]]:
    v4 = Trap()
    found = {"v4": v4}
    with contextlib.suppress(OSError):  # no IPv6 loopback: the ::1 cases check the refusal only
        found["v6"] = Trap("::1", v4.port)
    yield found
    for trap in found.values():
        trap.socket.close()


@pytest.mark.parametrize(
    ("client_id", "refused"),
    [
        ("https://127.0.0.1:{port}/client.json", {"127.0.0.1"}),
        ("https://localhost:{port}/client.json", {"127.0.0.1", "::1"}),
        ("https://[::1]:{port}/client.json", {"::1"}),
        ("https://[::ffff:127.0.0.1]:{port}/client.json", {"::ffff:7f00:1"}),
        ("https://0.0.0.0:{port}/client.json", {"0.0.0.0"}),
        ("https://169.254.169.254/latest/meta-data/client.json", {"169.254.169.254"}),
        ("https://[fd00:ec2::254]/latest/client.json", {"fd00:ec2::254"}),
        ("https://100.100.100.200/latest/client.json", {"100.100.100.200"}),
        ("https://10.0.0.1/client.json", {"10.0.0.1"}),
        ("https://192.168.1.1/client.json", {"192.168.1.1"}),
        ("https://224.0.0.1/client.json", {"224.0.0.1"}),
    ],
)
def test_an_unauthenticated_authorize_request_cannot_make_the_gateway_reach_an_internal_address(
    gateway: FixtureProcess, traps: dict[str, Trap], client_id: str, refused: set[str]
) -> None:
    answer = authorize(gateway.url, client_id.format(port=traps["v4"].port))
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"] == "invalid_client"
    assert body["error_description"] in {
        f"client metadata document refused: address {address} is not allowed" for address in refused
    }
    assert not any(trap.connected() for trap in traps.values())


def test_the_refusal_is_logged_and_the_port_is_never_probed(gateway: FixtureProcess) -> None:
    closed, trap = free_port(), Trap()
    try:
        answers = [authorize(gateway.url, f"https://127.0.0.1:{port}/c.json") for port in (closed, trap.port)]
        # Open or closed, the answer is the same: nothing to map ports with.
        assert answers[0].json() == answers[1].json()
        assert not trap.connected()
    finally:
        trap.socket.close()
    assert "client metadata document refused" in gateway.output()


# --- allow-listed loopback, in-process: what the guard does once an address may be reached --------


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def document_for(client_id: str) -> bytes:
    return json.dumps({"client_id": client_id, "redirect_uris": [REDIRECT]}).encode()


@pytest.fixture
async def loopback() -> AsyncIterator[tuple[LocalServer, Scripted, ssl.SSLContext]]:
    ca = tls_ca()
    server = LocalServer(tls=ca.issue_cert("127.0.0.1", "client.test"))

    def answer(request: Received) -> Answer:
        own = f"{server.url}{request.path}"
        if request.path == "/redirect.json":
            return Answer(302, headers={"location": f"{server.url}/client.json"})
        if request.path == "/large.json":
            return Answer(200, [b" " * 4096] * 4 + [document_for(own)])
        if request.path == "/endless.json":
            return Answer(200, [b" " * 4096] * 64, end="hang")
        return Answer(200, [document_for(own)], {"content-type": "application/json"})

    scripted = Scripted(answer)
    async with server.serve(scripted):
        yield server, scripted, trusting(ca)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/redirect.json", "redirects are not followed (HTTP 302)"),
        ("/large.json", "larger than 5120 bytes"),
        ("/endless.json", "larger than 5120 bytes"),
    ],
)
async def test_an_allow_listed_fetch_still_follows_no_redirect_and_stops_at_the_size_limit(
    loopback: tuple[LocalServer, Scripted, ssl.SSLContext], path: str, why: str
) -> None:
    server, scripted, trust = loopback
    guard = FetchGuard(["127.0.0.1/32"], ssl_context=trust)
    async with asyncio.timeout(10):
        with pytest.raises(FetchRefused) as refused:
            await guard.get(f"{server.url}{path}", max_bytes=5120, timeout_s=5)
    assert str(refused.value) == why
    assert [r.path for r in scripted.received] == [path]  # the redirect's target was never asked for


async def test_a_name_is_resolved_once_and_the_connection_goes_to_the_address_checked(
    loopback: tuple[LocalServer, Scripted, ssl.SSLContext],
) -> None:
    """DNS rebinding: the name answers an allowed address for the check, then another one. The second
    answer is never asked for; the certificate is still verified against the name."""
    server, scripted, trust = loopback
    elsewhere = Trap("127.0.0.2", server.port)
    answers = iter([["127.0.0.1"], ["127.0.0.2"]])
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    guard = FetchGuard(["127.0.0.1"], resolve=rebinding, ssl_context=trust)
    try:
        body = await guard.get(f"https://client.test:{server.port}/client.json", max_bytes=5120, timeout_s=5)
        assert json.loads(body)["client_id"] == f"{server.url}/client.json"
        assert asked == ["client.test"] and not elsewhere.connected()
        assert scripted.received[0].headers["host"] == f"client.test:{server.port}"
    finally:
        elsewhere.socket.close()


@pytest.mark.parametrize(
    "addresses",
    [["93.184.216.34", "127.0.0.1"], ["2606:2800:220:1::1", "fe80::1"], ["64:ff9b::a00:1"], []],
)
async def test_a_name_with_any_internal_address_is_refused_before_connecting(addresses: list[str]) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    with pytest.raises(FetchRefused) as refused:
        await FetchGuard(resolve=resolve).get("https://client.test/c.json", max_bytes=5120, timeout_s=5)
    assert "is not allowed" in str(refused.value) or "does not resolve" in str(refused.value)


async def test_an_allow_listed_host_name_may_resolve_to_a_private_address(
    loopback: tuple[LocalServer, Scripted, ssl.SSLContext],
) -> None:
    server, _, trust = loopback

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    guard = FetchGuard(["client.test"], resolve=resolve, ssl_context=trust)
    assert await guard.get(f"https://client.test:{server.port}/client.json", max_bytes=5120, timeout_s=5)
    with pytest.raises(FetchRefused, match=r"^address 127\.0\.0\.1 is not allowed$"):
        await guard.get(f"https://other.test:{server.port}/client.json", max_bytes=5120, timeout_s=5)


# --- the config file's allow list, end to end ------------------------------------------------------


async def test_a_loopback_document_works_once_the_config_file_allow_lists_it(tmp_path: Path) -> None:
    ca = tls_ca()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = LocalServer(tls=ca.issue_cert("127.0.0.1"))
    client_id = f"{server.url}/client.json"
    scripted = Scripted(lambda request: Answer(200, [document_for(client_id)]))
    config: dict[str, Any] = {"policy": POLICY, "fetch_allow": ["127.0.0.1"]}
    port = free_port()
    args = gateway_args(write_config(tmp_path, config), port, f"sqlite:///{tmp_path / 'agentgw.db'}")
    trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}  # the gateway's TLS trusts the test CA
    with start_process(args, port, env=trust) as gateway:
        async with server.serve(scripted), httpx.AsyncClient(timeout=30) as http:
            params = authorize_params(client_id)
            form = await http.get(f"{gateway.url}/oauth/authorize", params=params)
            assert form.status_code == 200 and 'type="password"' in form.text
            redirect = await http.get(f"{gateway.url}/oauth/authorize", params=params | {"redirect_uri": "x"})
            assert redirect.status_code == 400
    assert [r.path for r in scripted.received] == ["/client.json"]  # cached for the second request
