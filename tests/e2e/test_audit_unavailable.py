"""An unwritable audit store makes the gateway refuse calls with a clear error, never pass them unaudited."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from agentgw.storage import make_engine
from agentgw.storage.audit import create_audit_tables
from tests.e2e.test_audit_crash import config, read, upstream_uris
from tests.support.gateway import run_gateway
from tests.support.mcp import MODERN


async def test_an_unwritable_audit_store_refuses_calls_with_a_clear_error(
    tmp_path: Path, modern_upstream: str
) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    create_audit_tables(engine)
    engine.dispose()
    readonly = f"sqlite:///file:{path}?mode=ro&uri=true"
    prefix = f"fixture://items/{uuid.uuid4().hex[:8]}-"
    with run_gateway(tmp_path, config(modern_upstream, audit={"database_url": readonly})) as gw:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await read(http, gw.mcp("modern"), f"{prefix}1", 1)
        error = response.json()["error"]
        assert error["code"] == -32603
        assert "audit log unavailable" in error["message"] and "not forwarded" in error["message"]
        async with Client(gw.mcp("modern"), mode=MODERN) as client:
            with pytest.raises(MCPError, match="audit log unavailable"):
                await client.call_tool("echo", {"text": "unaudited?"})
        assert "records not written" in gw.output()
    assert await upstream_uris(modern_upstream, prefix) == set()


async def test_calls_refused_for_an_unwritable_audit_store_log_one_line_each_and_no_traceback(
    tmp_path: Path, modern_upstream: str
) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    create_audit_tables(engine)
    engine.dispose()
    readonly = f"sqlite:///file:{path}?mode=ro&uri=true"
    prefix = f"fixture://items/{uuid.uuid4().hex[:8]}-"
    with run_gateway(tmp_path, config(modern_upstream, audit={"database_url": readonly})) as gw:
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(5):
                response = await read(http, gw.mcp("modern"), f"{prefix}{n}", n)
                assert "audit log unavailable" in response.json()["error"]["message"]
        output = gw.output()
    assert "Traceback" not in output, "an expected refusal is no crash"
    lines = [line for line in output.splitlines() if "audit record not written: decision error" in line]
    assert len(lines) == 5
    assert all("(audit log unavailable:" in line for line in lines), "each line says why"
