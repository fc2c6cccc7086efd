"""The SQL engine: SQLite (WAL) by default, any SQLAlchemy URL through `AGENTGW_DATABASE_URL`.

A server database (PostgreSQL) is reached through a pool with explicit limits (`DatabaseSettings`),
kept healthy without a restart: each connection is pinged before use, replaced after
`pool_recycle_s`, and a session the server refuses to write in is discarded with every connection of
the pool opened before it (a failover leaves sessions on a read-only node that stay read-only even
once a writable primary answers at the same address). Connecting and each statement are time-limited,
so that a hung server fails calls quickly instead of holding them for the whole outage.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from pydantic import BaseModel, Field
from sqlalchemy import Engine, event, make_url
from sqlalchemy.engine import ExceptionContext
from sqlmodel import SQLModel, create_engine

__all__ = [
    "STATEMENT_TIMEOUT_S",
    "DatabaseSettings",
    "create_db",
    "ensure_private_dir",
    "in_thread",
    "make_engine",
    "select_one",
]

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_S = 5.0

# SQLSTATEs of a session that is alive but can no longer serve the gateway: read_only_sql_transaction
# (a standby, or a primary demoted by a failover).
_DISCARD_SQLSTATES = frozenset({"25006"})


def ensure_private_dir(path: Path) -> None:
    """Create `path` owner-only (0700) if missing; warn when an existing one is open to others.

    An existing directory keeps its mode: it may be shared on purpose (the working directory, say),
    and changing it is the operator's call.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("data directory %s is readable by others: it holds keys (chmod 700 it)", path)


class DatabaseSettings(BaseModel):
    """Pool and time limits of the gateway's server databases (`database_url`, `audit.database_url`)."""

    # Connections kept open, and opened beyond them at busy times.
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    # How long a call waits for a free connection before it is refused.
    pool_timeout_s: float = Field(default=2.0, gt=0)
    # A connection older than this is replaced at its next use.
    pool_recycle_s: float = Field(default=1800.0, gt=0)
    # Whole seconds (libpq's unit; it treats less than 2 as 2).
    connect_timeout_s: int = Field(default=2, ge=1)
    # The longest one store call may take: the server cancels a statement after it (and ends a session
    # idle in a transaction as long, which releases its row locks), and the gateway refuses a call whose
    # store has not answered by then (a hung server, a network that drops packets).
    statement_timeout_s: float = Field(default=STATEMENT_TIMEOUT_S, gt=0)


def make_engine(url: str, settings: DatabaseSettings | None = None) -> Engine:
    """Create the engine; SQLite gets WAL and NORMAL sync (durable across process crashes).

    Args:
        url: any SQLAlchemy URL.
        settings: the gateway's pool and time limits. None (the command-line tools) puts no time limit
            on statements: `agentgw audit verify` reads a whole log in one.
    """
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
    limits = settings or DatabaseSettings()
    connect_args: dict[str, Any] = {}
    if make_url(url).get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = limits.connect_timeout_s
        if settings is not None:
            ms = round(settings.statement_timeout_s * 1000)
            connect_args["options"] = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=limits.pool_size,
        max_overflow=limits.max_overflow,
        pool_timeout=limits.pool_timeout_s,
        pool_recycle=limits.pool_recycle_s,
        connect_args=connect_args,
    )
    event.listen(engine, "handle_error", _discard_unwritable)
    return engine


def _discard_unwritable(context: ExceptionContext) -> None:
    # Handled as a lost connection: SQLAlchemy closes it and replaces every connection of the pool
    # opened before it; otherwise each would go back to the pool and fail every call it serves.
    error = context.original_exception
    if (getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)) in _DISCARD_SQLSTATES:
        context.is_disconnect = True


T = TypeVar("T")


async def in_thread(work: Callable[[], T]) -> T:
    """`work` (blocking database calls) run in a worker thread, off the event loop.

    A cancelled caller (a timeout around it, a client gone) is not held until the driver answers: the
    thread is left to finish on its own and its result dropped.
    """
    return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)


def select_one(engine: Engine) -> None:
    """Reach the database with the cheapest statement: raises where a call's first statement would."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def create_db(engine: Engine) -> None:
    """Create every table the imported models declare (idempotent).

    Storage's own tables are imported here; rooms above storage (the registry) import theirs before
    calling, since storage may not import them.
    """
    # Imported for their side effect: each registers its tables on SQLModel's metadata.
    import agentgw.storage.budget.local
    import agentgw.storage.budget.rules
    import agentgw.storage.budget.table  # noqa: F401

    SQLModel.metadata.create_all(engine)
