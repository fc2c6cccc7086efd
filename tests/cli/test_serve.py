"""`agentgw serve`: the uvicorn options it runs with; `--workers N` and the budget store (a local ledger
counts in one process only)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import redis
import yaml
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from agentgw import __version__
from agentgw.cli import _parser, main
from agentgw.cli.serve import _uvicorn_options, worker_node_urls
from agentgw.settings import Settings
from conformance.fixtures.launch import (
    FixtureProcess,
    free_port,
    free_ports,
    start_process,
    start_upstream_sync,
    stdio_command,
)
from tests.support.gateway import gateway_args, run_gateway, write_config
from tests.support.mcp import ACCEPT, answer_of

REDIS = "redis://127.0.0.1:6379/0"


def test_several_workers_with_the_local_budget_store_refuse_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {"database_url": f"sqlite:///{tmp_path / 'gw.db'}", "redis_url": "redis://127.0.0.1:6379/0"}
        )
    )
    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2
    error = capsys.readouterr().err
    assert "--workers > 1 needs budgets.store sql or redis" in error
    assert not (tmp_path / "gw.db").exists()  # refused before anything was started


def test_several_workers_with_a_metrics_port_refuse_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = tmp_path / "gateway.yaml"
    settings = {
        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
        "redis_url": "redis://127.0.0.1:6379/0",
        "budgets": {"store": "redis"},
        "metrics": {"port": free_port()},
    }
    config.write_text(yaml.safe_dump(settings))
    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2
    assert "--workers > 1 cannot serve metrics.port" in capsys.readouterr().err
    assert not (tmp_path / "gw.db").exists()  # refused before anything was started


def test_serve_trusts_no_forwarding_headers_and_names_no_server_software() -> None:
    # uvicorn's default trusts X-Forwarded-For/-Proto from 127.0.0.1; nothing here needs them.
    args = _parser().parse_args(["serve"])
    options = _uvicorn_options(args, Settings())
    assert options["proxy_headers"] is False
    assert options["access_log"] is False


def test_a_served_answer_names_no_server_software_and_keeps_its_date(tmp_path: Path) -> None:
    with run_gateway(tmp_path, {"policy": {"allow_empty": True}}) as gateway:
        response = httpx.get(f"{gateway.url}/healthz")
    assert response.status_code == 200
    assert "server" not in response.headers
    assert "date" in response.headers  # RFC 9110: an origin server with a clock sends it


def test_version_is_in_the_cli_the_banner_and_healthz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentgw {__version__}"
    config = {
        "policy": {"allow_empty": True},
        "a2a_agents": [
            {
                "name": "helper",
                "card": {
                    "name": "Helper",
                    "description": "helps",
                    "version": "1.0.0",
                    "supportedInterfaces": [
                        {"url": "http://127.0.0.1:9/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
                    ],
                    "capabilities": {},
                    "defaultInputModes": ["text/plain"],
                    "defaultOutputModes": ["text/plain"],
                    "skills": [],
                },
            }
        ],
        "llm_routes": [{"name": "fast", "base_url": "http://127.0.0.1:9/v1", "model": "m"}],
    }
    with run_gateway(tmp_path, config) as gateway:
        health = httpx.get(f"{gateway.url}/healthz").json()
        banner = gateway.output()
    assert health["version"] == __version__
    assert f"agentgw {__version__} listening on {gateway.url}" in banner
    assert f"A2A agent 'helper': {gateway.url}/a2a/helper" in banner
    assert "LLM model 'fast'" in banner


@pytest.mark.parametrize("kind", ["modern", "legacy", "sse", "stdio"])
def test_serve_stops_within_a_second_of_sigterm_with_upstream_sessions_open(
    tmp_path: Path, kind: str
) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "stdio":
            command, args = stdio_command()
            server = {"name": "up", "transport": "stdio", "command": command, "args": args}
        else:
            upstream = stack.enter_context(start_upstream_sync(kind))
            server = {"name": "up", "url": f"{upstream}/sse" if kind == "sse" else f"{upstream}/mcp"}
            server |= {"transport": "sse"} if kind == "sse" else {}
        config = {"policy": {"allow_empty": True}, "servers": [server]}
        gateway = stack.enter_context(run_gateway(tmp_path, config))
        deadline = time.monotonic() + 30
        while "upstream up connected" not in gateway.output():
            assert time.monotonic() < deadline, gateway.output()
            time.sleep(0.05)
        process = gateway.process.process
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        took = time.monotonic() - started
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit is "by SIGTERM".
    assert process.returncode == -signal.SIGTERM
    assert took < 1.0, f"shutdown took {took:.2f} s"


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the gateway closes `sock` within `seconds` (reading until the end; a 408 may come first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connections_that_send_nothing_or_send_slowly_are_closed(tmp_path: Path, http: str) -> None:
    config = {"policy": {"allow_empty": True}, "client_idle_timeout_s": 0.5, "client_read_timeout_s": 1.0}
    config_path = write_config(tmp_path, config)
    port = free_port()
    args = [*gateway_args(config_path, port, f"sqlite:///{tmp_path / 'gw.db'}"), "--http", http]
    with start_process(args, port) as gateway:
        with socket.create_connection(("127.0.0.1", port)) as idle:
            assert _closed_within(idle, 5), "a connection that never sends a request is closed"
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /mcp/demo HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            closed = False
            while not closed and time.monotonic() - started < 5:
                try:
                    slow.sendall(b"x")  # a slow-loris client: one more header byte now and then
                except OSError:
                    closed = True
                    break
                closed = _closed_within(slow, 0.3)
            assert closed, "a request whose headers never finish is cut off"
            assert time.monotonic() - started < 4
        with socket.create_connection(("127.0.0.1", port)) as body:
            body.sendall(b"POST /mcp/demo HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{")
            assert _closed_within(body, 5), "a request whose body never finishes is cut off"
        # A client that keeps to the limits is served as ever, on one kept-alive connection.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert [client.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]
        assert "Traceback" not in gateway.output()


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # Fields after the ")" that ends the command name: state, then the parent's pid.
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    children.add(int(entry.name))
    return children


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _listening_sockets(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` (state 0A in /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                    inodes.add(int(fields[9]))
    return inodes


def _sockets_of(pid: int) -> set[int]:
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _workers_config() -> dict[str, Any]:
    return {
        "policy": {"allow_empty": True},
        "redis_url": "redis://127.0.0.1:6379/0",
        "budgets": {"store": "redis", "redis_prefix": f"test-serve-workers-{uuid.uuid4().hex}:"},
    }


@contextlib.contextmanager
def _serving_workers(tmp_path: Path, config: dict[str, Any]) -> Iterator[FixtureProcess]:
    """`agentgw serve --workers 2`, once every worker serves (its banner says so)."""
    port = free_ports(3)
    args = [
        *gateway_args(write_config(tmp_path, config), port, f"sqlite:///{tmp_path / 'gw.db'}"),
        "--workers",
        "2",
    ]
    with start_process(args, port) as gateway:
        deadline = time.monotonic() + 60
        while "with 2 workers" not in gateway.output():
            assert time.monotonic() < deadline, gateway.output()
            assert gateway.process.poll() is None, gateway.output()
            time.sleep(0.05)
        yield gateway


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP])
def test_workers_stop_with_their_parent_on_sigint_and_sighup(tmp_path: Path, stop: signal.Signals) -> None:
    with _serving_workers(tmp_path, _workers_config()) as gateway:
        descendants = _children(gateway.process.pid)
        started = time.monotonic()
        gateway.process.send_signal(stop)
        gateway.process.wait(10)
        assert time.monotonic() - started < 2.0
        assert gateway.process.returncode == 0, gateway.output()
        while any(_running(pid) for pid in descendants):
            assert time.monotonic() - started < 5, [pid for pid in descendants if _running(pid)]
            time.sleep(0.05)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading and /proc are Linux's"
)
def test_workers_listen_on_a_socket_each_so_a_burst_of_connections_reaches_all_of_them(
    tmp_path: Path,
) -> None:
    with _serving_workers(tmp_path, _workers_config()) as gateway:
        deadline = time.monotonic() + 60
        parent = gateway.process.pid
        answered = []
        for _ in range(40):  # each on a new connection, as a burst of new clients would come
            with httpx.Client(base_url=gateway.url) as client:
                response = client.get("/healthz", headers={"connection": "close"})
            assert response.status_code == 200
            answered.append(response.json()["pid"])
        descendants = _children(parent)
        workers = set(answered)
        assert len(workers) == 2 and workers <= descendants, (answered, descendants)
        # The mechanism: not one socket shared by all, but one listening socket in each worker.
        listening = _listening_sockets(gateway.port)
        assert len(listening) == 2
        assert [len(_sockets_of(pid) & listening) for pid in sorted(workers)] == [1, 1]
        assert not _sockets_of(parent) & listening

        # A worker that dies is replaced, and its replacement takes its share of new connections.
        killed = min(workers)
        os.kill(killed, signal.SIGKILL)
        replaced = set()
        while not replaced:
            assert time.monotonic() < deadline, gateway.output()
            try:
                with httpx.Client(base_url=gateway.url) as client:
                    pid = client.get("/healthz", headers={"connection": "close"}).json()["pid"]
            except httpx.TransportError:
                continue  # a connection queued at the dying worker is reset (docs/configuration.md)
            replaced = {pid} - workers
        assert replaced <= _children(parent)
        assert f"worker {killed} exited" in gateway.output()
        workers = workers - {killed} | replaced
        descendants |= replaced

        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(10)
        took = time.monotonic() - started
        assert gateway.process.returncode == 0, gateway.output()
        assert took < 2.0, f"the group took {took:.2f} s to stop"
        assert not {pid for pid in workers if _running(pid)}, "workers outlived the parent"
        # multiprocessing's helper processes, if any, leave with their parent too.
        while any(_running(pid) for pid in descendants):
            assert time.monotonic() - started < 5, [pid for pid in descendants if _running(pid)]
            time.sleep(0.05)
        assert "Traceback" not in gateway.output()


@pytest.mark.parametrize("offset", [0, 2], ids=["the port", "a worker's own port"])
def test_workers_refuse_a_port_something_already_listens_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], offset: int
) -> None:
    # With SO_REUSEPORT a second gateway would otherwise silently share the first one's port.
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = {"redis_url": "redis://127.0.0.1:6379/0", "budgets": {"store": "redis"}}
    port = free_ports(3)
    with socket.create_server(("127.0.0.1", port + offset), reuse_port=True):
        argv = [
            "serve",
            "--config",
            str(write_config(tmp_path, config)),
            "--port",
            str(port),
            "--workers",
            "2",
        ]
        assert main(argv) == 1
    assert f"cannot listen on 127.0.0.1:{port + offset}" in capsys.readouterr().err


def test_workers_that_cannot_start_stop_the_group_with_an_error(tmp_path: Path) -> None:
    # An empty policy makes every worker's app refuse to start: restarting them would loop forever.
    config = {k: v for k, v in _workers_config().items() if k != "policy"}
    port = free_ports(3)
    args = [
        *gateway_args(write_config(tmp_path, config), port, f"sqlite:///{tmp_path / 'gw.db'}"),
        "--workers",
        "2",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "could not start" in done.stderr
    assert "listening on" not in done.stdout


def test_each_worker_is_reached_on_the_node_urls_host_at_a_port_of_its_own() -> None:
    # A pod bound to 0.0.0.0 names its pod IP: each worker's URL is that IP with its own port.
    pod = Settings(host="0.0.0.0", port=8080, node_url="http://10.0.3.17:8080")
    assert worker_node_urls(pod, 2) == [(8081, "http://10.0.3.17:8081"), (8082, "http://10.0.3.17:8082")]
    assert worker_node_urls(Settings(host="::1", port=9000), 1) == [(9001, "http://[::1]:9001")]
    # No node URL: the node forwards nothing, so its workers need no port of their own.
    assert worker_node_urls(Settings(host="0.0.0.0", port=8080), 2) == []


def _owner_of(session_id: str) -> str:
    """The node URL a bridged session's binding in Redis names."""
    raw = redis.Redis.from_url(REDIS).get(f"agentgw:mcp-session:{session_id}")
    assert raw is not None, session_id
    owner: str = json.loads(raw)["upstream"]
    return owner


# No keep-alive: each request is a new connection, which the kernel may give to either worker.
_NO_KEEPALIVE = httpx2.Limits(max_keepalive_connections=0)


def _new_connection_each_time(
    headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None
) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers=headers, timeout=timeout or 30, auth=auth, limits=_NO_KEEPALIVE)


@pytest.fixture(scope="module")
def bridging_workers(
    tmp_path_factory: pytest.TempPathFactory, legacy_upstream: str
) -> Iterator[FixtureProcess]:
    """`serve --workers 2` bridging a 2025-11-25 upstream on `/mcp` (sessions held by the SDK)."""
    config = _workers_config() | {
        "allow_anonymous": True,
        "servers": [{"name": "legacy", "url": f"{legacy_upstream}/mcp"}],
        "policy": {"rules": ["p, anonymous, mcp:legacy/*, *, allow"]},
    }
    with _serving_workers(tmp_path_factory.mktemp("bridging"), config) as gateway:
        yield gateway


def _worker_urls(gateway: FixtureProcess) -> set[str]:
    return {f"http://127.0.0.1:{gateway.port + n}" for n in (1, 2)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
async def test_a_bridged_session_continues_on_whichever_worker_takes_each_request(
    bridging_workers: FixtureProcess,
) -> None:
    gateway = bridging_workers
    # Each worker also answers on a port of its own, which its bindings name.
    pids = {httpx.get(f"{url}/healthz").json()["pid"] for url in _worker_urls(gateway)}
    assert len(pids) == 2 and pids <= _children(gateway.process.pid)
    sessions: set[str] = set()

    async def seen(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            sessions.add(response.headers["mcp-session-id"])

    http = _new_connection_each_time()
    http.event_hooks["response"].append(seen)
    transport = streamable_http_client(f"{gateway.url}/mcp", http_client=http)
    with anyio.fail_after(30):
        async with http, Client(transport, mode="legacy") as mcp:
            for i in range(12):
                result = await mcp.call_tool("legacy__echo", {"text": f"call{i}"})
                assert result.content[0].text == f"call{i}"  # type: ignore[union-attr]
            [session] = sessions
            assert _owner_of(session) in _worker_urls(gateway)
            # Whichever worker a request reaches, this one included, it is served: by the owner, or
            # forwarded by the other worker to the owner's own port.
            headers = {"accept": ACCEPT, "mcp-protocol-version": "2025-11-25", "mcp-session-id": session}
            listing = {"jsonrpc": "2.0", "id": 99, "method": "tools/list"}
            for url in _worker_urls(gateway):
                listed = answer_of(httpx.post(f"{url}/mcp", json=listing, headers=headers, timeout=10))
                assert "legacy__echo" in {tool["name"] for tool in listed["result"]["tools"]}, url


async def test_an_http_sse_sessions_messages_reach_it_through_either_worker(
    bridging_workers: FixtureProcess,
) -> None:
    gateway = bridging_workers
    opened: list[str] = []
    # The stream stays on one worker; each message comes on a new connection.
    with anyio.fail_after(30):
        async with (
            sse_client(
                f"{gateway.url}/mcp/_sse",
                httpx_client_factory=_new_connection_each_time,
                on_session_created=opened.append,
            ) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            for i in range(12):
                result = await session.call_tool("legacy__echo", {"text": f"sse{i}"})
                assert result.content[0].text == f"sse{i}"  # type: ignore[union-attr]
            assert _owner_of(opened[0]) in _worker_urls(gateway)
