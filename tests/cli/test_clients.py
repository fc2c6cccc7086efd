"""`agentgw clients list|revoke`: registered clients from the command line; revoking ends their logins."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentgw.cli import main
from agentgw.oauth.refresh import RefreshRefused, RefreshTokenStore
from agentgw.oauth.registration import ClientMetadata, ClientStore
from agentgw.storage import make_engine


def test_revoking_a_client_from_the_cli_ends_its_logins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    monkeypatch.setenv("AGENTGW_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    engine = make_engine(url)
    metadata = ClientMetadata(redirect_uris=["http://127.0.0.1:5000/cb"], client_name="a tool")
    client_id = ClientStore(engine).register(metadata, source="127.0.0.1", max_clients=10)["client_id"]
    refresh = RefreshTokenStore(engine, ttl_s=60, max_s=600)
    token = refresh.start(
        client_id=client_id, subject="alice", scope="", resource="http://127.0.0.1:8080/mcp"
    )

    assert main(["clients", "list", "--database-url", url]) == 0
    listed = capsys.readouterr().out
    assert client_id in listed and "live" in listed
    assert main(["clients", "revoke", client_id, "--database-url", url]) == 0
    with pytest.raises(RefreshRefused, match="revoked"):
        refresh.take(token, client_id)
    assert main(["clients", "revoke", "agc_nobody", "--database-url", url]) == 1
    assert main(["clients", "list", "--database-url", url]) == 0
    assert "revoked" in capsys.readouterr().out
