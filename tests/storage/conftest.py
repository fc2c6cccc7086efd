"""Databases for the store tests: a SQLite file per test, a PostgreSQL database per session (or per
test, for a test that alters the database itself), and proxies in front of PostgreSQL and Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.support.proxy import TcpProxy

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_PORT = 5432
REDIS_PORT = 6379


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (dropped afterwards), so tables are ours alone."""
    name = f"agentgw_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def own_postgres() -> Iterator[str]:
    """The name of a fresh PostgreSQL database for this test alone (dropped afterwards)."""
    name = f"agentgw_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the machine's PostgreSQL, for this test to break."""
    with TcpProxy(POSTGRES_PORT) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the machine's Redis, for this test to break."""
    with TcpProxy(REDIS_PORT) as proxy:
        yield proxy
