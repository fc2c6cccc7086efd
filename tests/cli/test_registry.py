"""`agentgw registry`: add, list, show and remove servers in the database; bad input is refused."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from mcp.server.mcpserver import MCPServer

from agentgw.cli import main
from tests.support.servers import LocalServer, unused_url


def run(capsys: pytest.CaptureFixture[str], db: str, *args: str) -> tuple[int, str, str]:
    code = main(["registry", args[0], "--database-url", db, *args[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_server_added_is_listed_shown_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, out, _ = run(
        capsys, db, "add", "github", "--url", "http://127.0.0.1:9/mcp", "--timeout", "5", "--no-verify"
    )
    assert (code, out.strip()) == (0, "added github")
    code, out, _ = run(capsys, db, "list", "--no-check")
    assert "github\tstreamable-http\thttp://127.0.0.1:9/mcp\tenabled\n" in out
    code, out, _ = run(capsys, db, "show", "github")
    assert json.loads(out)["timeout_s"] == 5
    code, out, _ = run(capsys, db, "remove", "github")
    assert (code, out.strip()) == (0, "removed github")
    code, out, _ = run(capsys, db, "list")
    assert "github" not in out


def test_bad_input_is_refused_field_by_field_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = run(capsys, db, "add", "Bad/Name", "--url", "ftp://x")
    assert code == 2
    assert "name: Value error, invalid name" in err
    assert "url: Value error, invalid url" in err
    code, _, err = run(capsys, db, "add", "local", "--transport", "stdio")
    assert code == 2 and "needs a command" in err
    assert run(capsys, db, "list")[1] == ""


def test_duplicates_and_unknown_names_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert run(capsys, db, "add", "a", "--url", "http://127.0.0.1:9/mcp", "--no-verify")[0] == 0
    code, _, err = run(capsys, db, "add", "a", "--url", "http://127.0.0.1:9/mcp", "--no-verify")
    assert code == 1 and "already exists" in err
    assert run(capsys, db, "remove", "nope")[0] == 1
    assert run(capsys, db, "show", "nope")[0] == 1


def test_servers_owned_by_the_config_file_cannot_be_edited_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "servers:\n  - name: owned\n    url: http://127.0.0.1:9/mcp\npolicy:\n  allow_empty: true\n"
    )
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code = main(["registry", "list", "--config", str(config), "--database-url", db])
    capsys.readouterr()
    assert code == 0
    code, _, err = run(capsys, db, "remove", "owned")
    assert code == 1 and "declared in the config file" in err


def test_a_stdio_server_is_added_only_with_an_allow_listed_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path / 'state'}\nstdio_allowed_commands: [[/usr/bin/mcp-git]]\n")
    db = f"sqlite:///{tmp_path / 'r.db'}"

    def add(*argv: str) -> tuple[int, str]:
        code = main(["registry", "add", "--config", str(config), "--database-url", db, *argv])
        return code, capsys.readouterr().err

    code, err = add("shell", "--transport", "stdio", "--command", "/bin/sh", "--arg=-c", "--arg=id")
    assert code == 2 and "stdio_allowed_commands" in err
    assert add("git", "--transport", "stdio", "--command", "/usr/bin/mcp-git")[0] == 0
    assert run(capsys, db, "list")[1].count("\n") == 1


@contextmanager
def mcp_upstream() -> Iterator[str]:
    """A real MCP server (two tools) on 127.0.0.1, in a thread of its own (the CLI runs its own loop)."""
    server = MCPServer("checked")
    server.add_tool(lambda city: city, name="echo_city", description="Echo.")
    server.add_tool(lambda: "ok", name="ping", description="Ping.")
    local = LocalServer()
    stop = threading.Event()

    async def serve() -> None:
        async with local.serve(server.streamable_http_app(host="127.0.0.1")):
            await anyio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        yield f"{local.url}/mcp"
    finally:
        stop.set()
        thread.join(10)


def test_add_checks_the_upstream_speaks_mcp_and_refuses_a_dead_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    dead = unused_url()
    code, _, err = run(capsys, db, "add", "dead", "--url", f"{dead}/mcp")
    assert code == 1 and "error: upstream dead failing: ConnectError" in err and "--no-verify" in err
    assert run(capsys, db, "list", "--no-check")[1] == ""  # nothing stored
    with mcp_upstream() as url:
        code, out, err = run(capsys, db, "add", "live", "--url", url)
        assert (code, out.strip()) == (0, "added live")
        assert "checked live: ready (2 tools)" in err
        assert run(capsys, db, "add", "dead", "--url", f"{dead}/mcp", "--no-verify")[0] == 0
        code, out, _ = run(capsys, db, "list")
    assert code == 0
    lines = sorted(out.splitlines())
    assert lines[0].startswith(f"dead\tstreamable-http\t{dead}/mcp\tenabled\tupstream failing: ConnectError")
    assert lines[1] == f"live\tstreamable-http\t{url}\tenabled\tupstream ready (2 tools)"
