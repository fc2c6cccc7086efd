"""Session-wide fixtures: upstream MCP servers started once per test session; a PostgreSQL database
of a test's own, and proxies in front of the machine's PostgreSQL and Redis for a test to break."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conformance.fixtures.launch import start_upstream_sync
from tests.support.postgres import fresh_database
from tests.support.proxy import TcpProxy

POSTGRES_PORT = 5432
REDIS_PORT = 6379


@pytest.fixture(scope="session")
def modern_upstream() -> Iterator[str]:
    """Base URL of the modern-era (2026-07-28) streamable-HTTP fixture; MCP at `<url>/mcp`."""
    with start_upstream_sync("modern") as url:
        yield url


@pytest.fixture(scope="session")
def legacy_upstream() -> Iterator[str]:
    """Base URL of the 2025-11-25-only fixture (sessions, sampling and elicitation mid-call)."""
    with start_upstream_sync("legacy") as url:
        yield url


@pytest.fixture(scope="session")
def sse_upstream() -> Iterator[str]:
    """Base URL of the 2024-11-05 HTTP+SSE fixture."""
    with start_upstream_sync("sse") as url:
        yield url


@pytest.fixture
def own_postgres() -> Iterator[str]:
    """The name of a fresh PostgreSQL database for this test alone (dropped afterwards)."""
    with fresh_database() as name:
        yield name


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--browser-all",
        action="store_true",
        help="run every browser test of the console, not only the bounded set CI runs by default",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--browser-all"):
        return
    skip = pytest.mark.skip(reason="a browser test outside the bounded set: run with --browser-all")
    for item in items:
        if "browser_full" in item.keywords:
            item.add_marker(skip)
