"""The README tour works: `agentgw serve` with no config, `agentgw token issue`, then docs/tour.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conformance.fixtures.launch import REPO_ROOT, free_port, start_process


def agentgw(data_dir: Path, port: int, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "agentgw", *args],
        cwd=REPO_ROOT,
        # The issuer and audience name the gateway's port; the signing key and database are found in
        # the same data directory as the gateway's.
        env={**os.environ, "AGENTGW_PORT": str(port), "AGENTGW_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_the_readme_tour_shows_two_users_a_denial_a_budget_stop_and_the_audit_trail(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "state"  # the README's commands use the default, ./.agentgw
    serve = [sys.executable, "-m", "agentgw", "serve", "--port", str(port)]
    with start_process(serve, port, env={"AGENTGW_DATA_DIR": str(data_dir)}) as gateway:  # the demo
        tokens = {
            user.upper(): agentgw(data_dir, port, "token", "issue", "--subject", user)
            for user in ("alice", "bob")
        }
        tour = subprocess.run(
            [sys.executable, str(REPO_ROOT / "docs" / "tour.py")],
            env={**os.environ, **tokens, "AGENTGW_URL": gateway.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert tour.returncode == 0, tour.stderr
        assert tour.stdout.splitlines() == [
            "alice sees ['demo__get_weather', 'demo__search_docs']",
            "bob sees ['demo__get_weather']",
            "delete_repo: denied by policy: user:alice may not call mcp:demo/delete_repo",
            "call 11: budget 'demo-run-calls' exhausted for run run-42: calls 10 of 10; it does not reset: "
            "start a new run",
        ]
        trail = agentgw(data_dir, port, "audit", "query", "--run", "run-42", "--decision", "denied")
        assert "budget_exceeded" in trail
        assert "ok" in agentgw(data_dir, port, "audit", "verify")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "oauth-keys.json").stat().st_mode) == 0o600
    assert (data_dir / "agentgw.db").exists()
