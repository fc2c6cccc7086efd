"""Session-wide fixtures: upstream MCP servers started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conformance.fixtures.launch import start_upstream_sync


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
