"""Reading the audit log: time filters, `AuditQuery`, pages of records as plain dictionaries."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, and_, select
from sqlalchemy.sql.elements import ColumnElement

from agentgw.records.audit import timestamp
from agentgw.storage.audit.chain import audit_log

__all__ = ["AuditQuery", "iter_records", "parse_time", "query"]

_LIST_COLUMNS = ("roles", "scopes", "actors", "upstream_actors")

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EARLIEST = 0.0  # no record is older than the Unix epoch


def parse_time(text: str, now: float | None = None) -> str:
    """A time filter as a `timestamp`: ISO 8601 (`2026-05-01T10:00:00Z`) or an age (`15m`, `2h`, `7d`).

    Raises:
        ValueError: neither form.
    """
    try:
        match = _RELATIVE.match(text.strip())
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
            # An age beyond the oldest possible record means "from the start".
            return timestamp(max((time.time() if now is None else now) - seconds, _EARLIEST))
        # RFC 3339 allows a lower-case `t` and `z`; `fromisoformat` takes only upper case.
        moment = datetime.fromisoformat(text.strip().upper())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return timestamp(moment.timestamp())
    except (ValueError, OverflowError, OSError) as exc:  # OSError: beyond the platform's time_t
        raise ValueError(
            f"invalid time {text!r}: use ISO 8601 (2026-05-01T10:00:00Z) or an age (15m, 2h, 7d)"
        ) from exc


@dataclass(slots=True)
class AuditQuery:
    """Filters; every one that is set must hold. `resource` takes a trailing `*` for a prefix."""

    since: str | None = None  # timestamp(), inclusive
    until: str | None = None  # timestamp(), exclusive
    subject: str | None = None
    actor: str | None = None
    client: str | None = None
    protocol: str | None = None
    resource: str | None = None
    decision: str | None = None
    run_id: str | None = None
    request_id: str | None = None
    event: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        c = audit_log.c
        out: list[ColumnElement[bool]] = []
        if self.since:
            out.append(c.time >= self.since)
        if self.until:
            out.append(c.time < self.until)
        for value, column in (
            (self.subject, c.subject),
            (self.client, c.client_id),
            (self.protocol, c.protocol),
            (self.decision, c.decision),
            (self.run_id, c.run_id),
            (self.request_id, c.request_id),
            (self.event, c.event),
        ):
            if value:
                out.append(column == value)
        if self.actor:
            out.append(c.actors.contains(orjson.dumps(self.actor).decode(), autoescape=True))
        if self.resource:
            if self.resource.endswith("*"):
                out.append(c.resource.startswith(self.resource[:-1], autoescape=True))
            else:
                out.append(c.resource == self.resource)
        return out


def _public(row: Mapping[Any, Any]) -> dict[str, Any]:
    # Column keys are str subclasses (quoted_name); plain str keeps every JSON encoder happy.
    out = {str(k): v for k, v in row.items()}
    for name in _LIST_COLUMNS:
        out[name] = orjson.loads(out[name])
    if out.get("arguments") is not None:
        out["arguments"] = orjson.loads(out["arguments"])
    return out


def query(
    engine: Engine,
    filters: AuditQuery,
    *,
    limit: int = 100,
    after_id: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Records matching `filters`, oldest first (or newest first), at most `limit`, after `after_id`."""
    stmt = select(audit_log).where(and_(True, *filters.where()))
    if after_id is not None:
        stmt = stmt.where(audit_log.c.id < after_id if newest_first else audit_log.c.id > after_id)
    stmt = stmt.order_by(audit_log.c.id.desc() if newest_first else audit_log.c.id).limit(limit)
    with engine.connect() as conn:
        return [_public(r._mapping) for r in conn.execute(stmt)]


def iter_records(engine: Engine, filters: AuditQuery, *, page: int = 1000) -> Iterator[dict[str, Any]]:
    """Every record matching `filters`, oldest first, read a page at a time (for export)."""
    after = 0
    while True:
        rows = query(engine, filters, limit=page, after_id=after)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1]["id"]
