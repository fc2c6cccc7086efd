"""`agentgw serve`: the uvicorn options it runs with; `--workers N` and the budget store (a local ledger
counts in one process only)."""

from __future__ import annotations

import contextlib
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

import httpx
import pytest
import yaml

from agentgw import __version__
from agentgw.cli import _parser, main
from agentgw.cli.serve import _uvicorn_options
from agentgw.settings import Settings
from conformance.fixtures.launch import (
    FixtureProcess,
    free_port,
    start_process,
    start_upstream_sync,
    stdio_command,
)
from tests.support.gateway import gateway_args, run_gateway, write_config


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
    port = free_port()
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


def test_workers_refuse_a_port_something_already_listens_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # With SO_REUSEPORT a second gateway would otherwise silently share the first one's port.
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = {"redis_url": "redis://127.0.0.1:6379/0", "budgets": {"store": "redis"}}
    with socket.create_server(("127.0.0.1", 0), reuse_port=True) as taken:
        port = taken.getsockname()[1]
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
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_workers_that_cannot_start_stop_the_group_with_an_error(tmp_path: Path) -> None:
    # An empty policy makes every worker's app refuse to start: restarting them would loop forever.
    config = {k: v for k, v in _workers_config().items() if k != "policy"}
    port = free_port()
    args = [
        *gateway_args(write_config(tmp_path, config), port, f"sqlite:///{tmp_path / 'gw.db'}"),
        "--workers",
        "2",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "could not start" in done.stderr
    assert "listening on" not in done.stdout
