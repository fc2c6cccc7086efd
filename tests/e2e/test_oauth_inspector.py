"""The MCP Inspector's CLI (npm `@modelcontextprotocol/inspector`, pinned in
conformance/fixtures/inspector), unmodified, logs in through `agentgw serve` by its own OAuth flow:
401 -> protected resource metadata -> authorization server metadata -> dynamic registration ->
the login form (submitted here, as the user's browser) -> its callback listener -> token -> tools/list."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from agentgw.oauth.server import hash_password
from conformance.fixtures.launch import REPO_ROOT, free_port
from tests.support.gateway import RunningGateway, run_gateway

NPM_INSTALL = REPO_ROOT / "conformance" / "fixtures" / "npm-install"
POLICY = ["p, role:developer, mcp:modern/*, *, allow", "g, user:alice, role:developer"]
PROMPT = "Please navigate to: "
WAIT_S = 60


@pytest.fixture(scope="module")
def inspector() -> list[str]:
    """The command line of the pinned Inspector's CLI mode."""
    node, installed = subprocess.run(
        [str(NPM_INSTALL), "inspector"], check=True, capture_output=True, text=True, timeout=600
    ).stdout.split()
    launcher = (
        Path(installed) / "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"
    )
    return [node, str(launcher), "--cli"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": POLICY},
        "auth": {"builtin": {"users": [{"name": "alice", "password_hash": hash_password("wonderland")}]}},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def test_the_inspector_cli_registers_logs_in_and_lists_tools(
    inspector: list[str], gateway: RunningGateway, tmp_path: Path
) -> None:
    callback = f"http://127.0.0.1:{free_port()}/oauth/callback"
    # Its token store and catalog go to a fresh home: nothing from an earlier run helps it. Without a
    # TTY it logs in only when told to open a browser; the "browser" it starts does nothing (this test
    # is the browser, reading the URL it prints).
    browser = tmp_path / "bin"
    browser.mkdir()
    (browser / "xdg-open").write_text("#!/bin/sh\nexit 0\n")
    (browser / "xdg-open").chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "NO_COLOR": "1",
        "MCP_AUTO_OPEN_ENABLED": "true",
        "BROWSER": str(browser / "xdg-open"),
        "PATH": f"{browser}:{os.environ['PATH']}",
    }
    command = [*inspector, gateway.mcp(), "--method", "tools/list", "--callback-url", callback]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    stderr: list[str] = []
    login_url: list[str] = []
    found = threading.Event()

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr.append(line)
            if PROMPT in line and not login_url:
                login_url.append(line.split(PROMPT, 1)[1].strip())
                found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert found.wait(WAIT_S), f"the Inspector asked for no login: {''.join(stderr)}"
        url = login_url[0]
        assert url.startswith(f"{gateway.url}/oauth/authorize?")
        fields = dict(parse_qsl(urlsplit(url).query))
        assert fields["client_id"].startswith("agc_"), "the Inspector did not register itself"
        # The user's browser: the login page, the password, then the redirect to the Inspector.
        page = httpx.get(url)
        assert page.status_code == 200 and "Sign in" in page.text
        answer = httpx.post(
            f"{gateway.url}/oauth/authorize", data=fields | {"username": "alice", "password": "wonderland"}
        )
        assert answer.status_code == 302, answer.text
        assert answer.headers["location"].startswith(callback)
        httpx.get(answer.headers["location"], timeout=30)
        out, _ = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    assert process.returncode == 0, f"{out}\n{''.join(stderr)}"
    tools = {tool["name"] for tool in json.loads(out)["tools"]}
    assert "modern__echo" in tools and "modern__whoami" in tools
    assert f"client registered client_id={fields['client_id']}" in gateway.output()
