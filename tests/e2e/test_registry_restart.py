"""Stored state never stops a start: servers stored under older rules (a secret located by env, a secret
since removed from the config file, a stdio command nobody allowed) are left out and reported as
failing, in the log, the admin API and `agentgw registry list`, while the rest serves."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from agentgw.cli import main
from agentgw.registry.models import McpServerRow
from agentgw.registry.store import RegistryVersion
from agentgw.storage import create_db, make_engine
from tests.support.gateway import run_gateway
from tests.support.mcp import META, answer_of, modern_headers


def test_the_gateway_starts_past_stored_servers_it_cannot_run_and_says_why(
    tmp_path: Path, modern_upstream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    marker = tmp_path / "pwned"
    engine = make_engine(database_url)
    create_db(engine)
    with Session(engine) as session:
        for name, spec in {
            # What the admin API used to accept with 201: a secret located by an unset variable.
            "legacy": {"url": "http://127.0.0.1:9/mcp", "credential": {"mode": "static", "env": "AGW_UNSET"}},
            "orphan": {"url": "http://127.0.0.1:9/mcp", "credential": {"mode": "static", "secret": "gone"}},
            "shell": {"transport": "stdio", "command": "/bin/sh", "args": ["-c", f"touch {marker}"]},
        }.items():
            session.add(McpServerRow(name=name, spec={"name": name, **spec}, source="api"))
        session.add(RegistryVersion(version=1))
        session.commit()
    engine.dispose()
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow", "p, anonymous, admin:registry, read, allow"]},
    }
    with run_gateway(tmp_path, config, database_url=database_url) as gw:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
        listed = httpx.post(gw.mcp("modern"), json=body, headers=modern_headers("tools/list"), timeout=30)
        assert answer_of(listed)["result"]["tools"]
        status = {s["name"]: s for s in httpx.get(f"{gw.url}/admin/registry/status").json()}
        assert status["modern"]["state"] == "ok"
        assert {n: status[n]["state"] for n in ("legacy", "orphan", "shell")} == dict.fromkeys(
            ("legacy", "orphan", "shell"), "failing"
        )
        assert "never an environment variable or a file" in status["legacy"]["problem"]
        assert "unknown secret 'gone'" in status["orphan"]["problem"]
        assert "stdio_allowed_commands" in status["shell"]["problem"]
        output = gw.output()
        assert all(f"server {n} is not served" in output for n in ("legacy", "orphan", "shell"))
        assert not marker.exists()
        assert (
            main(["registry", "list", "--config", str(gw.config_path), "--database-url", database_url]) == 0
        )
    listing = capsys.readouterr().out
    lines = {line.split("\t")[0]: line for line in listing.splitlines()}
    assert "\tenabled" in lines["modern"] and "failing: unknown secret 'gone'" in lines["orphan"]
    assert "failing:" in lines["legacy"] and "failing:" in lines["shell"]
