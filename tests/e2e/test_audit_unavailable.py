"""An unwritable audit store makes the gateway refuse calls with a clear error, never pass them unaudited."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from agentgw.storage import make_engine
from agentgw.storage.audit_log import create_audit_tables
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
