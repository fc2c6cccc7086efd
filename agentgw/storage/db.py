"""The SQL engine: SQLite (WAL) by default, any SQLAlchemy URL through `AGENTGW_DATABASE_URL`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import SQLModel, create_engine

__all__ = ["create_db", "make_engine"]


def make_engine(url: str) -> Engine:
    """Create the engine; SQLite gets WAL and NORMAL sync (durable across process crashes)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_db(engine: Engine) -> None:
    """Create every table the imported models declare (idempotent)."""
    # Imported for their side effect: each registers its tables on SQLModel's metadata.
    import agentgw.storage.budget_counters
    import agentgw.storage.budget_rules  # noqa: F401
    import registry.models  # noqa: F401

    SQLModel.metadata.create_all(engine)
