"""A real gateway signs its audit chain: `agentgw audit verify` passes after each clean stop and
restart, and fails once someone with database access rewrote the chain and its head."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import delete, select, update

from agentgw.cli import main
from agentgw.storage import make_engine
from agentgw.storage.audit import audit_chain, audit_checkpoint, audit_log, record_hash
from tests.support.gateway import data_dir_of, run_gateway

MODERN = "2026-07-28"


def rewrite_history(database_url: str) -> None:
    """Every `allowed` record of the first chain made `denied`, its hashes and head recomputed, and
    the checkpoints the database holds removed: what a database writer can do, short of the key."""
    engine = make_engine(database_url)
    with engine.begin() as conn:
        chain = conn.execute(select(audit_chain.c.chain).order_by(audit_chain.c.started_at)).scalars().first()
        rows = conn.execute(select(audit_log).where(audit_log.c.chain == chain).order_by(audit_log.c.seq))
        prev = None
        for found in [dict(r._mapping) for r in rows]:
            row = found | {"decision": "denied"} | ({"prev_hash": prev} if prev else {})
            row["hash"] = prev = record_hash(row)
            conn.execute(update(audit_log).where(audit_log.c.id == row["id"]).values(**row))
        conn.execute(update(audit_chain).where(audit_chain.c.chain == chain).values(head_hash=prev))
        conn.execute(delete(audit_checkpoint))
    engine.dispose()


async def test_a_gateways_log_verifies_across_restarts_and_a_rewritten_chain_does_not(
    tmp_path: Path, modern_upstream: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = {
        "allow_anonymous": True,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        "policy": {
            "rules": ["p, anonymous, mcp:modern/echo, *, allow", "p, anonymous, admin:audit, read, allow"]
        },
    }
    database_url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    # The command finds the checkpoint key and sink in the gateway's data directory, by its config.
    verify = ["audit", "verify", "--config", str(tmp_path / "gateway.yaml"), "--database-url", database_url]
    for life in range(2):
        with run_gateway(tmp_path, config, database_url=database_url) as gateway:
            async with Client(streamable_http_client(gateway.mcp("modern")), mode=MODERN) as client:
                await client.call_tool("echo", {"text": f"life {life}"})
            async with httpx.AsyncClient(base_url=gateway.url) as http:
                live = (await http.get("/admin/audit/verify")).json()
            assert live["ok"] and live["problem"] is None, live
        # Stopped: the final checkpoint covers every record, in the sink beside the key.
        assert main(verify) == 0
        out = capsys.readouterr().out
        assert f"in {life + 1} chains verify" in out and "not covered" not in out
        assert (data_dir_of(tmp_path) / "audit-checkpoint-key.pem").exists()
        assert len((data_dir_of(tmp_path) / "audit-checkpoints.jsonl").read_bytes().splitlines()) >= life + 1
    rewrite_history(database_url)
    assert main(verify) == 1
    assert "the chain was rewritten" in capsys.readouterr().err
