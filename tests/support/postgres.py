"""A PostgreSQL database of one's own on the machine's server, for a test or a benchmark run.

The server is shared by everyone working on the machine: each user gets a database under a fresh
name, dropped afterwards even while something still holds a connection to it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text

__all__ = ["POSTGRES_ADMIN", "fresh_database"]

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def fresh_database(admin_url: str = POSTGRES_ADMIN, prefix: str = "agentgw_test") -> Iterator[str]:
    """Create a database named `<prefix>_<random>` through `admin_url`; yield its name; drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
