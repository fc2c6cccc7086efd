"""Audit stage, outermost: one record per decision and per outcome, denials and errors included.

Two records tell a forwarded call's story, both with its `request_id`:
- `decision` (allowed): written by `Audit.admitted`, which the pipeline awaits after the last stage
  and before the terminal forwards the call. It must be durable first: a sink that cannot write
  raises `Unavailable` and the call is not forwarded (fail closed), so a crash can lose no record of
  a call the upstream saw.
- `outcome`: queued (`AuditSink.submit`, not awaited) when the reply (or, for a stream, its end) or
  the error comes back, so its commit adds nothing to the call's latency. The decision record
  already proves the call was forwarded; an outcome still queued when the process dies is lost
  (decision 0207). A record that cannot be written is logged.
A call refused before admission (no credentials, policy, budget) gets one `decision` record with
decision `denied` (or `error`), the reason and the message the caller saw; it is awaited.

Arguments are never stored as sent: every record carries the SHA-256 digest of the canonical JSON
arguments, and the decision record a copy redacted by `RedactionSettings` (values of secret-looking
argument names, of whole tools, and every e-mail address, bearer token, JWT and API key in any
string). The sink (`agentgw.storage.audit.SqlAuditLog`) chains, batches and stores the records.

Every string a caller chooses (method, resource, run and session ids, principal names, error text,
the redacted arguments) is capped here, where the record is built, with the caps of
`agentgw.records.audit`, which holds the record, the settings and the helpers storage and the
readers share.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import orjson

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import GatewayError, Unavailable
from agentgw.pipeline import CallNext
from agentgw.records.audit import (
    BUILTIN_PATTERNS,
    MAX_ARGUMENTS,
    MAX_DETAIL,
    MAX_METHOD,
    MAX_NAME,
    MAX_NAMES,
    MAX_RESOURCE,
    MAX_RUN_ID,
    MAX_SESSION_ID,
    MAX_STRING,
    MAX_UPSTREAM,
    AuditRecord,
    Event,
    RedactionSettings,
    Replacement,
    Verdict,
    builtin_replacement,
    capped,
    not_written,
    timestamp,
)
from agentgw.records.policy import object_match

__all__ = [
    "Audit",
    "AuditSink",
    "arguments_digest",
    "redact",
]


class _Needle:
    """Literals of which every string a pattern matches holds one: a string with none of them cannot
    match, so its substitution (a scan of the whole string) is skipped.

    `exact` are found as written; `folded` (lower case) wherever their pattern ignores case. A long
    ASCII string is searched with `in` on it and on its `lower()`, which for ASCII is what IGNORECASE
    does, and is many times faster than a regex trying every literal at every character; a short or
    non-ASCII string with one regex of the same literals (IGNORECASE folds a few non-ASCII letters).
    """

    def __init__(self, exact: tuple[str, ...], folded: tuple[str, ...] = ()) -> None:
        assert all(literal == literal.lower() for literal in folded)
        self.exact = exact
        self.folded = folded
        parts = [re.escape(literal) for literal in exact]
        if folded:
            parts.append("(?i:" + "|".join(re.escape(literal) for literal in folded) + ")")
        self.regex = re.compile("|".join(parts))

    def in_(self, value: str, lowered: str | None) -> bool:
        """Whether `value` holds a literal (`lowered`: `value.lower()` if it is long ASCII, else None)."""
        if lowered is None:
            return self.regex.search(value) is not None
        # Plain loops: cheaper than `any(map(...))`, whose setup costs more than a few `in`s.
        for literal in self.exact:
            if literal in value:
                return True
        for literal in self.folded:  # noqa: SIM110 - a generator costs what the loop saves
            if literal in lowered:
                return True
        return False


# Strings up to this long are searched with the regex: `in` costs more for each literal than the
# regex for a few characters.
_SHORT = 12

# For each built-in pattern of `BUILTIN_PATTERNS`, its needle: literals taken from every alternative
# of the pattern, with the same case rule. `bearer` and `basic` ignore case as their patterns do;
# `url_credentials` needs the `@` that ends a URL's user information (`://` alone is in every URL);
# `api_key` has `k-` (sk-, pk-, rk-), `gh?_`, `github_pat_`, `glpat-`, `xox`, `AKIA`, `AIza`, and the
# names of its `name: value` form, case ignored (a `:`, `=` or `_` alone is in too many strings:
# URLs, times, identifiers). Keep them in step with the patterns.
_NEEDLES: dict[str, _Needle] = {
    "bearer": _Needle((), ("bearer",)),
    "basic": _Needle((), ("basic",)),
    "jwt": _Needle(("eyJ",)),
    "url_credentials": _Needle(("@",)),
    "api_key": _Needle(
        ("k-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xox", "AKIA", "AIza"),
        ("apikey", "api_key", "api-key", "secret", "token", "password", "passwd", "pwd", "passphrase"),
    ),
    "email": _Needle(("@",)),
}
REDACTED = "[REDACTED]"
MAX_KNOWN_NAMES = 4096


class AuditSink(Protocol):
    """Where records go. `write` returns once the record is durable; `submit` does not wait."""

    async def write(self, record: AuditRecord) -> None:
        """Store `record` and return once it is durable.

        Raises:
            Unavailable: the record could not be written (the caller must not forward the call).
        """

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` and return at once; the sink logs it if it cannot be written later.

        Raises:
            Unavailable: the sink takes no more records (it is closed).
        """


# --- pure pieces --------------------------------------------------------------------------------


def _capped_names(names: tuple[str, ...]) -> tuple[str, ...]:
    # A list column: its items together (and the quotes and comma each costs) within MAX_NAMES.
    if not names or sum(map(len, names)) + 3 * len(names) <= MAX_NAMES:
        return names
    kept: list[str] = []
    left = MAX_NAMES - 32  # room for the marker
    for n, name in enumerate(names):
        name = capped(name, MAX_NAME)
        if len(name) + 3 > left:
            kept.append(f"…[truncated {len(names) - n} more]")
            break
        kept.append(name)
        left -= len(name) + 3
    return tuple(kept)


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
        # One regex for every secret-name glob: the lowered name against the lowered globs, as
        # `fnmatchcase` over each would (lowering both, rather than IGNORECASE, keeps its exact
        # semantics for non-ASCII names). No globs: no name is secret.
        globs = [fnmatch.translate(n.lower()) for n in [*settings.arguments, *settings.extra_arguments]]
        self.secret_names = re.compile("|".join(globs)) if globs else None
        # (pattern, replacement, needle): the substitution runs only where the needle is found.
        self.patterns: list[tuple[re.Pattern[str], Replacement, _Needle | None]] = [
            (pattern, builtin_replacement(name), _NEEDLES[name])
            for name, pattern in BUILTIN_PATTERNS.items()
            if name in settings.builtin
        ]
        self.patterns += [(re.compile(p), "[REDACTED:pattern]", None) for p in settings.patterns]
        # Every needle in one search: a string with none of them (most) skips the loop below. Only
        # when every pattern has a needle (no configured patterns).
        needles = [needle for _, _, needle in self.patterns if needle is not None]
        self.any_needle = (
            _Needle(
                tuple(dict.fromkeys(literal for needle in needles for literal in needle.exact)),
                tuple(dict.fromkeys(literal for needle in needles for literal in needle.folded)),
            )
            if needles and len(needles) == len(self.patterns)
            else None
        )
        # Argument names seen, and whether each is secret: a tool's names repeat on every call.
        self._names: dict[str, bool] = {}

    def secret_name(self, name: str) -> bool:
        known = self._names.get(name)
        if known is None:
            known = self.secret_names is not None and self.secret_names.match(name.lower()) is not None
            if len(self._names) >= MAX_KNOWN_NAMES:  # names come from callers: stay bounded
                self._names = {}
            self._names[name] = known
        return known

    def text(self, value: str) -> str:
        if len(value) <= _SHORT:
            # Most strings: one regex search, no more (a short string is never truncated).
            if self.any_needle is not None and self.any_needle.regex.search(value) is None:
                return value
            lowered = None
        else:
            lowered = value.lower() if value.isascii() else None
            if self.any_needle is not None and not self.any_needle.in_(value, lowered):
                return value if len(value) <= MAX_STRING else capped(value, MAX_STRING)
        for pattern, replacement, needle in self.patterns:
            # Checked on the string as it is now: a replacement may add a needle for the next.
            if needle is None or needle.in_(value, lowered):
                value = pattern.sub(replacement, value)
                if lowered is not None:
                    lowered = value.lower() if value.isascii() else None
        return value if len(value) <= MAX_STRING else capped(value, MAX_STRING)

    def named_secret(self, mapping: Mapping[Any, Any]) -> bool:
        # `{"name": "Authorization", "value": ...}`: headers, environment variables, form fields.
        for label in ("name", "key", "Name", "Key"):
            name = mapping.get(label)
            if isinstance(name, str) and self.secret_name(name):
                return True
        return False

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict | Mapping):  # dict first: the ABC's check is slower
            kept = {str(k): REDACTED if self.secret_name(str(k)) else self.value(v) for k, v in value.items()}
            if ("value" in kept or "Value" in kept) and self.named_secret(value):
                for label in ("value", "Value"):
                    if label in kept:
                        kept[label] = REDACTED
            return kept
        if isinstance(value, list | tuple):
            if len(value) == 2 and isinstance(value[0], str) and self.secret_name(value[0]):
                return [self.text(value[0]), REDACTED]  # `[name, value]`: a header list's item
            return [self.value(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.text(str(value))

    def arguments(self, arguments: Mapping[str, Any] | None, resource: str) -> str | None:
        if arguments is None or not self.settings.store_arguments:
            return None
        if self.settings.tools and any(object_match(resource, pattern) for pattern in self.settings.tools):
            kept: Any = dict.fromkeys((str(k) for k in arguments), REDACTED)
        else:
            kept = self.value(arguments)
        text = _canonical(kept).decode()
        if len(text) > MAX_ARGUMENTS:
            # Still JSON, which readers parse: the cut text as one JSON string. Escaping at most
            # doubles its length (every other character is written as it is).
            text = orjson.dumps(capped(text, MAX_ARGUMENTS // 2 - 1)).decode()
        return text


def redact(arguments: Mapping[str, Any] | None, resource: str, settings: RedactionSettings) -> str | None:
    """The arguments as the audit log keeps them: canonical JSON with every secret replaced."""
    return _Redactor(settings).arguments(arguments, resource)


def _verdict(exc: BaseException) -> Verdict:
    if isinstance(exc, GatewayError) and exc.http_status in (401, 403, 429):
        return "denied"
    return "error"


# --- the stage ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Caller:
    """The fields a call's records share, computed once: the decision's are reused by the outcome."""

    principal: Principal | None  # the objects they were computed from, to tell if the call changed
    arguments: Mapping[str, Any] | None
    subject: str | None
    client_id: str | None
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    actors: tuple[str, ...]
    args_digest: str | None


def _caller(call: Call, known: _Caller | None = None) -> _Caller:
    principal, arguments = call.principal, call.arguments
    if known is not None and known.principal is principal and known.arguments is arguments:
        return known
    if principal is None:
        return _Caller(None, arguments, None, None, (), (), (), arguments_digest(arguments))
    subject, client_id = principal.subject, principal.client_id
    return _Caller(
        principal,
        arguments,
        subject if len(subject) <= MAX_NAME else capped(subject, MAX_NAME),
        client_id if client_id is None or len(client_id) <= MAX_NAME else capped(client_id, MAX_NAME),
        _capped_names(principal.roles),
        _capped_names(tuple(sorted(principal.scopes))),
        _capped_names(principal.actors),
        arguments_digest(arguments),
    )


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
        # Calls whose decision record is written, by request id: their outcome is recorded against
        # it and reuses what the decision computed.
        self._admitted: dict[str, _Caller] = {}

    def _record(
        self, call: Call, caller: _Caller, event: Event, decision: Verdict, **fields: Any
    ) -> AuditRecord:
        # Everything else is read from the call each time: the terminal may still set some of it
        # (an A2A task id as session, the LLM route that answered as upstream). What the caller
        # chose is capped here, once (a length check per field when nothing is cut).
        resource, method, upstream = call.resource, call.method, call.upstream
        run_id, session_id = call.run_id, call.session_id
        return AuditRecord(
            time=timestamp(self._clock()),
            event=event,
            request_id=call.request_id,
            trace_id=call.trace_id,
            protocol=call.protocol,
            action=call.action,
            resource=resource if len(resource) <= MAX_RESOURCE else capped(resource, MAX_RESOURCE),
            method=method if len(method) <= MAX_METHOD else capped(method, MAX_METHOD),
            upstream=upstream if len(upstream) <= MAX_UPSTREAM else capped(upstream, MAX_UPSTREAM),
            decision=decision,
            run_id=run_id if run_id is None or len(run_id) <= MAX_RUN_ID else capped(run_id, MAX_RUN_ID),
            session_id=(
                session_id
                if session_id is None or len(session_id) <= MAX_SESSION_ID
                else capped(session_id, MAX_SESSION_ID)
            ),
            subject=caller.subject,
            client_id=caller.client_id,
            roles=caller.roles,
            scopes=caller.scopes,
            actors=caller.actors,
            credential_mode=call.credential_mode,
            upstream_actors=_capped_names(tuple(call.upstream_actors)),
            rule=call.decided_by,
            args_digest=caller.args_digest,
            **fields,
        )

    async def admitted(self, call: Call) -> None:
        """Durably record that `call` is allowed; the pipeline awaits this before forwarding.

        Raises:
            Unavailable: the record could not be written; the call must not be forwarded.
        """
        caller = _caller(call)
        record = self._record(
            call,
            caller,
            "decision",
            "allowed",
            arguments=self._redactor.arguments(call.arguments, call.resource),
        )
        try:
            await self._sink.write(record)
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(
                "audit log unavailable: the call cannot be recorded, so it was not forwarded"
            ) from exc
        self._admitted[call.request_id] = caller

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        started = time.perf_counter()
        try:
            reply = await call_next(call)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._failed(call, exc, started)
            raise
        caller = self._admitted.pop(call.request_id, None)
        if caller is None:
            # A stage answered without forwarding (nothing does yet): still one decision record.
            await self._quietly(self._record(call, _caller(call), "decision", "allowed", status=reply.status))
            return reply
        if reply.streaming:

            async def settle(usage: Usage) -> None:
                self._submit(self._outcome(call, caller, reply.status, usage, started, reply.detail))

            reply.on_settle(settle)
        else:
            self._submit(self._outcome(call, caller, reply.status, reply.usage, started))
        return reply

    def _outcome(
        self,
        call: Call,
        caller: _Caller,
        status: str,
        usage: Usage | None,
        started: float,
        detail: str | None = None,
    ) -> AuditRecord:
        return self._record(
            call,
            _caller(call, caller),
            "outcome",
            "allowed",
            status=status,
            # A stream that ended badly is recorded as a failed call is: its reason and what happened.
            reason=status if detail is not None else None,
            detail=detail,
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
        # Error text may quote what the caller sent (a tool name) or what the upstream answered.
        detail = capped(exc.message, MAX_DETAIL) if isinstance(exc, GatewayError) else None
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        caller = self._admitted.pop(call.request_id, None)
        if caller is not None:
            self._submit(
                self._record(
                    call,
                    _caller(call, caller),
                    "outcome",
                    "allowed",
                    status=reason,
                    reason=reason,
                    detail=detail,
                    latency_ms=latency_ms,
                )
            )
            return
        record = self._record(
            call,
            _caller(call),
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
        # Refusals: the call is already decided and its answer must reach the caller. The
        # admitted-decision record, which gates forwarding, is written by `admitted` instead.
        try:
            await self._sink.write(record)
        except GatewayError as exc:
            not_written(record, exc_info=False, why=exc.message)  # expected: one line, no traceback
        except Exception:
            not_written(record)

    def _submit(self, record: AuditRecord) -> None:
        # Outcomes: the decision record already proves the call was forwarded, so the reply need
        # not wait for this one's commit (decision 0207); the sink logs it if it fails later.
        try:
            self._sink.submit(record)
        except GatewayError as exc:
            not_written(record, exc_info=False, why=exc.message)
        except Exception:
            not_written(record)
