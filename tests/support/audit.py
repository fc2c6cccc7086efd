"""Reading a running gateway's audit log from the test process.

Records are durable in the gateway's journal before it answers and reach SQL a moment later
(decision 0210): a reader in another process polls until what it expects is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from sqlalchemy import Engine

from agentgw.storage.audit import AuditQuery, query

__all__ = ["keys", "records_until"]

WAIT_S = 20.0


async def records_until(
    engine: Engine,
    filters: AuditQuery,
    ready: Callable[[list[dict[str, Any]]], bool],
    *,
    wait_s: float = WAIT_S,
) -> list[dict[str, Any]]:
    """The records matching `filters` once `ready(records)` holds; fails after `wait_s` with the last
    records read."""
    records: list[dict[str, Any]] = []
    try:
        with anyio.fail_after(wait_s):
            while True:
                records = query(engine, filters, limit=500)
                if ready(records):
                    return records
                await anyio.sleep(0.05)  # polling another process's log: no event to wait on
    except TimeoutError:
        raise AssertionError(f"audit log not as expected after {wait_s}s: {records}") from None


def keys(records: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(subject, resource, event, decision) of each record."""
    return {(r["subject"], r["resource"], r["event"], r["decision"]) for r in records}
