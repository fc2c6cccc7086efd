"""Databases for the store tests: a SQLite file per test, and a PostgreSQL database per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import fresh_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (dropped afterwards), so tables are ours alone."""
    with fresh_database() as name:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
