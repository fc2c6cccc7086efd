"""docs/deployment.md's state table matches the code: the gateway is built with the embedded
defaults and with PostgreSQL and Redis, and each component's store is the one the table names."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from agentgw.app import build_gateway
from agentgw.app.gateway import Gateway
from agentgw.filters.credentials import MemoryTokenCache
from agentgw.settings import Settings, load_settings
from tests.support.postgres import fresh_database

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
REDIS = "redis://127.0.0.1:6379/0"


def _table() -> dict[str, list[str]]:
    """state -> its cells: embedded default, PostgreSQL, + Redis, shared."""
    rows: dict[str, list[str]] = {}
    lines = DOC.read_text().split("## Which state lives where", 1)[1].splitlines()
    for line in lines:
        if line.startswith("| ") and not line.startswith("| state") and not set(line) <= set("|- "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def _kind(engine: Engine) -> str:
    return {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[engine.dialect.name]


def _stores(gateway: Gateway) -> dict[str, str]:
    """The store each component of the table uses, named as the table names them."""
    sessions = type(gateway.passthrough._sessions).__name__
    bridged = type(gateway.bridge._bindings).__name__
    owners = type(gateway.a2a._owners).__name__
    budget = type(gateway.budget_store).__name__
    cache = gateway.credentials.cache if gateway.credentials is not None else None
    shared = cache._shared if isinstance(cache, MemoryTokenCache) else None
    return {
        "registry": _kind(gateway.registry.engine),
        "audit log": _kind(gateway.audit_log.engine),
        "budget counters": {
            "LocalBudgetStore": "local",
            "SqlBudgetStore": "sql",
            "RedisBudgetStore": "redis",
        }[budget],
        "legacy MCP sessions": "Redis" if sessions == "RedisSessionStore" else "memory",
        "A2A task ownership": "Redis" if owners == "RedisTaskOwners" else "memory",
        "authorization codes": _kind(gateway.identity.pending.engine),
        "exchanged upstream tokens": "Redis" if shared is not None else "memory",
        # Shared only when the node also forwards requests for the sessions it does not hold.
        "legacy sessions of the bridge": (
            "Redis" if bridged == "RedisSessionStore" and gateway.nodes is not None else "memory"
        ),
    }


def _cell(rows: dict[str, list[str]], component: str, column: int) -> str:
    matches = [cells for state, cells in rows.items() if state.startswith(component)]
    assert len(matches) == 1, f"the table has no single row for {component!r}"
    return matches[0][column]


def _settings(path: Path, text: str) -> Settings:
    path.write_text(text + "policy:\n  rules: ['p, anonymous, mcp:x/*, *, allow']\n")
    return load_settings(path)


async def _close(gateway: Gateway) -> None:
    await gateway.budget_store.aclose()
    await gateway.a2a.aclose()
    await gateway.identity.aclose()
    if gateway.credentials is not None:
        await gateway.credentials.aclose()
    gateway.audit_log.close()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    key_file = tmp_path / "token-cache-key"
    key_file.write_text("k" * 32)
    with fresh_database() as name:
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        local = build_gateway(_settings(tmp_path / "embedded.yaml", f"data_dir: {tmp_path / 'embedded'}\n"))
        scale = build_gateway(
            _settings(
                tmp_path / "scale.yaml",
                f"data_dir: {tmp_path / 'scale'}\n"
                f"database_url: {database_url}\n"
                f"redis_url: {REDIS}\n"
                f"budgets:\n  store: redis\n  redis_prefix: 'agentgw:test:{uuid.uuid4().hex}:'\n"
                "token_cache:\n  secret: token-cache\n"
                f"secrets:\n  token-cache: {{file: {key_file}}}\n",
            )
        )
        try:
            yield local, scale
        finally:
            for gateway in (local, scale):
                asyncio.run(_close(gateway))


def test_the_state_table_names_the_store_each_component_uses(gateways: tuple[Gateway, Gateway]) -> None:
    rows = _table()
    assert len(rows) >= 10, "the state table was not found"
    local, scale = gateways
    for component, store in _stores(local).items():
        cell = _cell(rows, component, 0)
        assert re.search(rf"\b{re.escape(store)}\b", cell), (
            f"{component}: the code uses {store}, the table says {cell!r}"
        )
    for component, store in _stores(scale).items():
        cell = _cell(rows, component, 2)
        assert re.search(rf"\b{re.escape(store)}\b", cell), (
            f"{component}: the code uses {store}, the table says {cell!r}"
        )
