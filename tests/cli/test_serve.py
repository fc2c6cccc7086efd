"""`agentgw serve`: the uvicorn options it runs with; `--workers N` and the budget store (a local ledger
counts in one process only)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from agentgw.cli import _parser, main
from agentgw.cli.serve import _uvicorn_options
from agentgw.settings import Settings
from tests.support.gateway import run_gateway


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
