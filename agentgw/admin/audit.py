"""Admin API for auditors, under /admin/audit; guarded by the `admin:audit` read grant.

    GET /admin/audit/records  ?since=&until=&subject=&actor=&client=&protocol=&resource=&decision=
                              &run_id=&request_id=&event=&limit=&after=&newest_first=
                              -> {"records": [...], "next": <after for the next page> | null}
    GET /admin/audit/export   same filters, &format=jsonl|otel -> JSON Lines (one record, or one
                              OpenTelemetry log record, per line)
    GET /admin/audit/verify   -> {"ok", "records", "chains", "problem", "checkpoints", "unproven",
                              "pending"}: the hash chains checked, held to their signed checkpoints

Times are ISO 8601 (`2026-05-01T10:00:00Z`) or ages (`15m`, `2h`, `7d`).

Every read first awaits the log's flush barrier (`SqlAuditLog.flush`): outcome records are queued
without waiting for their commit (decision 0207), and an auditor who got a reply and then asks
this gateway must find that call's outcome.

Answers are JSON with every character that is not printable escaped (`printable`), also those JSON
writes as they are (DEL, C1 and bidi controls): a record read in a terminal shows what it holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from functools import partial
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from agentgw.api_contract import Guard, invalid
from agentgw.errors import Unavailable
from agentgw.records.audit import printable
from agentgw.storage import in_thread
from agentgw.storage.audit import AuditQuery, VerifyReport, otel_record, parse_time, query, verify

__all__ = ["audit_router"]

PAGE = 1000
# What `parse_time` takes, for the OpenAPI document; empty is no filter.
TIME: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "maxLength": 0},
        {"type": "string", "pattern": r"^\d+(?:\.\d+)?[smhd]$"},
    ]
}


class NdjsonResponse(StreamingResponse):
    media_type = "application/x-ndjson"


def _filters(
    since: Annotated[str | None, Query(json_schema_extra=TIME)] = None,
    until: Annotated[str | None, Query(json_schema_extra=TIME)] = None,
    subject: str | None = None,
    actor: str | None = None,
    client: str | None = None,
    protocol: str | None = None,
    resource: str | None = None,
    decision: str | None = None,
    run_id: str | None = None,
    request_id: str | None = None,
    event: str | None = None,
) -> AuditQuery:
    return AuditQuery(
        since=_time("since", since),
        until=_time("until", until),
        subject=subject,
        actor=actor,
        client=client,
        protocol=protocol,
        resource=resource,
        decision=decision,
        run_id=run_id,
        request_id=request_id,
        event=event,
    )


def _time(name: str, text: str | None) -> str | None:
    try:
        return parse_time(text) if text else None
    except ValueError as exc:
        raise invalid("query", name, str(exc), text) from exc


def _json(value: Any) -> bytes:
    return printable(orjson.dumps(value).decode(), in_json=True).encode()


async def _read(work: Callable[[], Any]) -> Any:
    try:
        return await in_thread(work)
    except SQLAlchemyError as exc:
        raise Unavailable("audit log unavailable") from exc


def audit_router(
    engine: Engine,
    read_guard: Guard,
    *,
    flush: Callable[[], Awaitable[None]] | None = None,
    check: Callable[[], VerifyReport] | None = None,
) -> APIRouter:
    """Routes under /admin/audit (read-only: the log is append-only, also for administrators).

    Args:
        engine: the audit log's database.
        read_guard: the dependency that admits auditors.
        flush: awaited before every read, so that it sees every record this process queued before
            the request (the gateway passes its `SqlAuditLog.flush`).
        check: runs `verify` (the gateway passes its `SqlAuditLog.verify`, which holds the chains to
            their checkpoints); default: the chains alone.
    """
    router = APIRouter(prefix="/admin/audit", tags=["audit"])

    async def flushed() -> None:
        if flush is not None:
            await flush()

    # Plain defaults, not Annotated aliases: under postponed annotations FastAPI cannot see a local alias.
    read = Depends(read_guard)
    chosen = Depends(_filters)

    @router.get("/records")
    async def records(
        _: Any = read,
        filters: AuditQuery = chosen,
        limit: Annotated[int, Query(ge=1, le=PAGE)] = 100,
        after: int | None = None,
        newest_first: bool = False,
    ) -> Response:
        await flushed()
        rows = await _read(
            lambda: query(engine, filters, limit=limit, after_id=after, newest_first=newest_first)
        )
        body = {"records": rows, "next": rows[-1]["id"] if len(rows) == limit else None}
        return Response(_json(body), media_type="application/json")

    @router.get("/export", response_class=NdjsonResponse)
    async def export(
        _: Any = read,
        filters: AuditQuery = chosen,
        fmt: Annotated[Literal["jsonl", "otel"], Query(alias="format")] = "jsonl",
    ) -> NdjsonResponse:
        await flushed()

        async def lines() -> AsyncIterator[bytes]:
            after = 0
            while True:
                rows = await _read(partial(query, engine, filters, limit=PAGE, after_id=after))
                for row in rows:
                    yield _json(otel_record(row) if fmt == "otel" else row) + b"\n"
                if len(rows) < PAGE:
                    return
                after = rows[-1]["id"]

        return NdjsonResponse(lines())

    @router.get("/verify")
    async def verify_log(_: Any = read) -> dict[str, Any]:
        await flushed()
        report = await _read(check or (lambda: verify(engine)))
        return {
            "ok": report.ok,
            "records": report.records,
            "chains": report.chains,
            "problem": asdict(report.problem) if report.problem else None,
            "checkpoints": report.checkpoints,
            "unproven": report.unproven,
            "pending": report.pending,
        }

    return router
