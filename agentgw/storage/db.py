"""The SQL engine: SQLite (WAL) by default, any SQLAlchemy URL through `AGENTGW_DATABASE_URL`."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel, create_engine

__all__ = ["create_db", "ensure_private_dir", "make_engine"]

log = logging.getLogger(__name__)


def ensure_private_dir(path: Path) -> None:
    """Create `path` owner-only (0700) if missing; warn when an existing one is open to others.

    An existing directory keeps its mode: it may be shared on purpose (the working directory, say),
    and changing it is the operator's call.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("data directory %s is readable by others: it holds keys (chmod 700 it)", path)


def make_engine(url: str) -> Engine:
    """Create the engine; SQLite gets WAL and NORMAL sync (durable across process crashes)."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            # The default database lives in the data directory, which the first command creates.
            Path(database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
