"""`agentgw serve`: the uvicorn options it runs with; `--workers N` and the budget store (a local ledger
counts in one process only)."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

from agentgw import __version__
from agentgw.cli import _parser, main
from agentgw.cli.serve import _uvicorn_options
from agentgw.settings import Settings
from conformance.fixtures.launch import free_port, start_process, start_upstream_sync, stdio_command
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
