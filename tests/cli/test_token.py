"""`agentgw token issue`: which issuer and audience it mints for."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from agentgw.cli import main
from agentgw.identity import record_base_url
from agentgw.settings import load_settings


def minted(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["token", "issue", "--subject", "alice", *args]) == 0
    claims: dict[str, object] = jwt.decode(
        capsys.readouterr().out.strip(), options={"verify_signature": False}
    )
    return claims


def test_the_issuer_is_the_url_the_gateway_on_this_data_directory_serves_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AGENTGW_CONFIG", "AGENTGW_PORT", "AGENTGW_HOST", "AGENTGW_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AGENTGW_DATA_DIR", str(tmp_path))
    assert minted(capsys)["iss"] == "http://127.0.0.1:8080"  # nothing recorded: host and port

    record_base_url(load_settings(None, port=9123))
    claims = minted(capsys)
    assert claims["iss"] == "http://127.0.0.1:9123" and claims["aud"] == ["http://127.0.0.1:9123/mcp"]
    assert minted(capsys, "--resource", "http://127.0.0.1:9123/v1")["aud"] == ["http://127.0.0.1:9123/v1"]

    monkeypatch.setenv("AGENTGW_PORT", "9200")  # the environment names the gateway meant
    assert minted(capsys)["iss"] == "http://127.0.0.1:9200"
    monkeypatch.delenv("AGENTGW_PORT")
    monkeypatch.setenv("AGENTGW_PUBLIC_URL", "https://gw.example.com")
    assert minted(capsys)["iss"] == "https://gw.example.com"
