"""Audit stage, outermost: one record per decision and outcome, denials and errors included.

This is the simple log; the hash-chained, group-committed log replaces `SqlAuditSink` behind the
same `AuditSink` protocol.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

import anyio.to_thread
from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel

from agentgw.call import Call, Reply
from agentgw.errors import GatewayError
from agentgw.pipeline import CallNext

__all__ = ["Audit", "AuditRecord", "AuditSink", "SqlAuditSink"]


class AuditRecord(SQLModel, table=True):
    __tablename__ = "audit_record"

    id: int | None = Field(default=None, primary_key=True)
    time: datetime
    request_id: str = Field(index=True)
    run_id: str | None = None
    session_id: str | None = None
    subject: str | None = Field(default=None, index=True)
    protocol: str
    action: str
    resource: str = Field(index=True)
    method: str
    upstream: str
    decision: str  # allowed | denied | error
    reason: str | None = None
    rule: str | None = None
    status: str
    latency_ms: float


class AuditSink(Protocol):
    async def write(self, record: AuditRecord) -> None: ...


class SqlAuditSink:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _insert(self, record: AuditRecord) -> None:
        with Session(self._engine) as session:
            session.add(record)
            session.commit()

    async def write(self, record: AuditRecord) -> None:
        await anyio.to_thread.run_sync(self._insert, record)


class Audit:
    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        started = time.perf_counter()
        try:
            reply = await call_next(call)
        except GatewayError as exc:
            decision = "denied" if exc.http_status in (401, 403, 429) else "error"
            await self._record(call, started, decision, exc.reason, str(exc.http_status))
            raise
        except Exception:
            await self._record(call, started, "error", "internal_error", "500")
            raise
        await self._record(call, started, "allowed", None, reply.status)
        return reply

    async def _record(
        self, call: Call, started: float, decision: str, reason: str | None, status: str
    ) -> None:
        principal = call.principal
        await self._sink.write(
            AuditRecord(
                time=datetime.now(UTC),
                request_id=call.request_id,
                run_id=call.run_id,
                session_id=call.session_id,
                subject=principal.subject if principal else None,
                protocol=call.protocol,
                action=call.action,
                resource=call.resource,
                method=call.method,
                upstream=call.upstream,
                decision=decision,
                reason=reason,
                rule=call.decided_by,
                status=status,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        )
