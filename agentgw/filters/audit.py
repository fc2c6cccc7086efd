"""Audit stage, outermost: one record per decision and per outcome, denials and errors included.

Two records tell a forwarded call's story, both with its `request_id`:
- `decision` (allowed): written by `Audit.admitted`, which the pipeline awaits after the last stage
  and before the terminal forwards the call. It must be durable first: a sink that cannot write
  raises `Unavailable` and the call is not forwarded (fail closed), so a crash can lose no record of
  a call the upstream saw.
- `outcome`: written when the reply (or, for a stream, its end) or the error comes back.
A call refused before admission (no credentials, policy, budget) gets one `decision` record with
decision `denied` (or `error`), the reason and the message the caller saw.

Arguments are never stored as sent: every record carries the SHA-256 digest of the canonical JSON
arguments, and the decision record a copy redacted by `RedactionSettings` (values of secret-looking
argument names, of whole tools, and every e-mail address, bearer token, JWT and API key in any
string). The sink (`agentgw.storage.audit_log.SqlAuditLog`) chains, batches and stores the records.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentgw.call import Call, Reply, Usage
from agentgw.errors import GatewayError, Unavailable
from agentgw.filters.authorize import object_match
from agentgw.pipeline import CallNext

__all__ = [
    "BUILTIN_PATTERNS",
    "Audit",
    "AuditRecord",
    "AuditSettings",
    "AuditSink",
    "RedactionSettings",
    "arguments_digest",
    "redact",
    "timestamp",
]

log = logging.getLogger(__name__)

Event = Literal["decision", "outcome"]
Verdict = Literal["allowed", "denied", "error"]
BuiltinPattern = Literal["email", "bearer", "jwt", "api_key"]

# Value patterns redacted wherever they appear inside a string argument. Order matters: a bearer
# token is replaced whole before the JWT pattern could leave its scheme behind.
BUILTIN_PATTERNS: dict[str, re.Pattern[str]] = {
    "bearer": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*"),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"),
    "api_key": re.compile(
        r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"
        r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"
        r"|\bglpat-[A-Za-z0-9_-]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
        r"|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{35}"
        r"|(?i:\b(?:api[_-]?key|secret|token|password|passwd)\s*[:=]\s*)[^\s,;&\"']+"
    ),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
}
DEFAULT_SECRET_ARGUMENTS = [
    "*password*",
    "*passwd*",
    "*secret*",
    "*token*",
    "*api_key*",
    "*apikey*",
    "*api-key*",
    "authorization",
    "cookie",
    "*credential*",
    "*private_key*",
]
_ALL_BUILTIN: tuple[BuiltinPattern, ...] = ("bearer", "jwt", "api_key", "email")
REDACTED = "[REDACTED]"
# Long strings are cut: the audit log is evidence of what was asked, not a copy of every payload.
MAX_STRING = 1024


class RedactionSettings(BaseModel):
    """What of a call's arguments the audit log may keep (the digest is kept always)."""

    model_config = ConfigDict(extra="forbid")

    # Policy-object patterns (`mcp:vault/*`) whose argument values are all replaced.
    tools: list[str] = Field(default_factory=list)
    # Argument names (at any depth; case-insensitive; `*` globs) whose values are replaced.
    arguments: list[str] = Field(default_factory=lambda: list(DEFAULT_SECRET_ARGUMENTS))
    # Built-in value patterns redacted inside every string.
    builtin: list[BuiltinPattern] = Field(default_factory=lambda: list(_ALL_BUILTIN))
    # More value patterns (regular expressions), redacted inside every string.
    patterns: list[str] = Field(default_factory=list)
    # False: keep only the digest.
    store_arguments: bool = True

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redaction pattern {pattern!r} is not a regular expression: {exc}") from exc
        return patterns


class AuditSettings(BaseModel):
    """The `audit:` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    # The audit log's own database; default: the gateway's `database_url`.
    database_url: str | None = None
    # Names this process's hash chain (suffixed with a random id per start); default: the host name.
    node_id: str | None = None
    # Records older than this are deleted (the chain keeps an anchor, so it still verifies).
    retention_days: float | None = Field(default=None, gt=0)
    # Group commit: at most this many records per transaction.
    batch_max: int = Field(default=512, ge=1)
    # What a committed record survives. `crash` (the default): the gateway process dying, SIGKILL
    # included (SQLite WAL with synchronous=NORMAL: no disk flush per commit). `power`: a power cut or
    # OS crash too (synchronous=FULL: one flush per group commit, milliseconds on most disks).
    durability: Literal["crash", "power"] = "crash"
    redact: RedactionSettings = Field(default_factory=RedactionSettings)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit record as the stage produces it; the sink adds its place in the hash chain."""

    time: str
    event: Event
    request_id: str
    protocol: str
    action: str
    resource: str
    method: str
    upstream: str
    decision: Verdict
    run_id: str | None = None
    session_id: str | None = None
    trace_id: str | None = None
    subject: str | None = None
    client_id: str | None = None
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    actors: tuple[str, ...] = ()
    credential_mode: str | None = None
    upstream_actors: tuple[str, ...] = ()
    reason: str | None = None
    rule: str | None = None
    detail: str | None = None
    status: str | None = None
    latency_ms: float | None = None
    tokens: int | None = None
    cost: float | None = None
    args_digest: str | None = None
    arguments: str | None = None


class AuditSink(Protocol):
    """Where records go. `write` returns once the record is durable.

    Raises:
        Unavailable: the record could not be written (the caller must not forward the call).
    """

    async def write(self, record: AuditRecord) -> None: ...


# --- pure pieces --------------------------------------------------------------------------------


def timestamp(epoch: float) -> str:
    """UTC time in one fixed-width format, so that string order is time order in every database."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)


def arguments_digest(arguments: Mapping[str, Any] | None) -> str | None:
    """`sha256:<hex>` of the canonical JSON of the arguments as sent (None when there are none)."""
    if arguments is None:
        return None
    return "sha256:" + hashlib.sha256(_canonical(arguments)).hexdigest()


class _Redactor:
    def __init__(self, settings: RedactionSettings) -> None:
        self.settings = settings
        self.names = [n.lower() for n in settings.arguments]
        self.patterns: list[tuple[str, re.Pattern[str]]] = [
            (name, BUILTIN_PATTERNS[name]) for name in BUILTIN_PATTERNS if name in settings.builtin
        ]
        self.patterns += [("pattern", re.compile(p)) for p in settings.patterns]

    def secret_name(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self.names)

    def text(self, value: str) -> str:
        for name, pattern in self.patterns:
            value = pattern.sub(f"[REDACTED:{name}]", value)
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "...[truncated]"

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {str(k): REDACTED if self.secret_name(str(k)) else self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.text(str(value))

    def arguments(self, arguments: Mapping[str, Any] | None, resource: str) -> str | None:
        if arguments is None or not self.settings.store_arguments:
            return None
        if any(object_match(resource, pattern) for pattern in self.settings.tools):
            kept: Any = dict.fromkeys((str(k) for k in arguments), REDACTED)
        else:
            kept = self.value(arguments)
        return _canonical(kept).decode()


def redact(arguments: Mapping[str, Any] | None, resource: str, settings: RedactionSettings) -> str | None:
    """The arguments as the audit log keeps them: canonical JSON with every secret replaced."""
    return _Redactor(settings).arguments(arguments, resource)


def _verdict(exc: BaseException) -> Verdict:
    if isinstance(exc, GatewayError) and exc.http_status in (401, 403, 429):
        return "denied"
    return "error"


# --- the stage ----------------------------------------------------------------------------------


class Audit:
    """Records every call; also the pipeline's admission hook (`admitted`), which must succeed."""

    def __init__(
        self,
        sink: AuditSink,
        redaction: RedactionSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._redactor = _Redactor(redaction or RedactionSettings())
        self._clock = clock
        # request ids whose decision record is written; the outcome is recorded against them.
        self._admitted: set[str] = set()

    def _record(self, call: Call, event: Event, decision: Verdict, **fields: Any) -> AuditRecord:
        principal = call.principal
        return AuditRecord(
            time=timestamp(self._clock()),
            event=event,
            request_id=call.request_id,
            protocol=call.protocol,
            action=call.action,
            resource=call.resource,
            method=call.method,
            upstream=call.upstream,
            decision=decision,
            run_id=call.run_id,
            session_id=call.session_id,
            subject=principal.subject if principal else None,
            client_id=principal.client_id if principal else None,
            roles=principal.roles if principal else (),
            scopes=tuple(sorted(principal.scopes)) if principal else (),
            actors=principal.actors if principal else (),
            credential_mode=call.credential_mode,
            upstream_actors=tuple(call.upstream_actors),
            rule=call.decided_by,
            args_digest=arguments_digest(call.arguments),
            **fields,
        )

    async def admitted(self, call: Call) -> None:
        """Durably record that `call` is allowed; the pipeline awaits this before forwarding.

        Raises:
            Unavailable: the record could not be written; the call must not be forwarded.
        """
        record = self._record(
            call, "decision", "allowed", arguments=self._redactor.arguments(call.arguments, call.resource)
        )
        try:
            await self._sink.write(record)
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(
                "audit log unavailable: the call cannot be recorded, so it was not forwarded"
            ) from exc
        self._admitted.add(call.request_id)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        started = time.perf_counter()
        try:
            reply = await call_next(call)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._failed(call, exc, started)
            raise
        if call.request_id not in self._admitted:
            # A stage answered without forwarding (nothing does yet): still one decision record.
            await self._quietly(self._record(call, "decision", "allowed", status=reply.status))
            return reply
        self._admitted.discard(call.request_id)
        if reply.streaming:

            async def settle(usage: Usage) -> None:
                await self._quietly(self._outcome(call, reply.status, usage, started))

            reply.on_settle(settle)
        else:
            await self._quietly(self._outcome(call, reply.status, reply.usage, started))
        return reply

    def _outcome(self, call: Call, status: str, usage: Usage | None, started: float) -> AuditRecord:
        return self._record(
            call,
            "outcome",
            "allowed",
            status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            tokens=usage.tokens if usage else None,
            cost=usage.cost if usage else None,
        )

    async def _failed(self, call: Call, exc: BaseException, started: float) -> None:
        reason = (
            exc.reason
            if isinstance(exc, GatewayError)
            else ("cancelled" if isinstance(exc, anyio.get_cancelled_exc_class()) else "internal_error")
        )
        detail = exc.message if isinstance(exc, GatewayError) else None
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if call.request_id in self._admitted:
            self._admitted.discard(call.request_id)
            record = self._record(
                call, "outcome", "allowed", status=reason, reason=reason, detail=detail, latency_ms=latency_ms
            )
        else:
            record = self._record(
                call,
                "decision",
                _verdict(exc),
                status=reason,
                reason=reason,
                detail=detail,
                latency_ms=latency_ms,
                arguments=self._redactor.arguments(call.arguments, call.resource),
            )
        await self._quietly(record)

    async def _quietly(self, record: AuditRecord) -> None:
        # Outcomes and refusals: the call is already decided and its answer must reach the caller.
        # The admitted-decision record, which gates forwarding, is written by `admitted` instead.
        try:
            await self._sink.write(record)
        except Exception:
            log.error(
                "audit record not written: %s %s %s %s",
                record.event,
                record.decision,
                record.request_id,
                record.resource,
                exc_info=True,
            )
