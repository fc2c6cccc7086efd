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
string). The sink (`agentgw.storage.audit_log.SqlAuditLog`) chains, batches and stores the records.

Every string a caller chooses (method, resource, run and session ids, principal names, error text,
the redacted arguments) is capped where the record is built (`capped`: its start and a marker saying
how much was cut), so that a record stays under `RECORD_MAX_BYTES` whatever the request (decision
0212). Records are stored as they came, control characters included; whatever shows them to a person
escapes them with `printable`.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import GatewayError, Unavailable
from agentgw.filters.authorize import object_match
from agentgw.pipeline import CallNext

__all__ = [
    "BUILTIN_PATTERNS",
    "Audit",
    "AuditRecord",
    "AuditSettings",
    "AuditSink",
    "CheckpointSettings",
    "RedactionSettings",
    "arguments_digest",
    "builtin_replacement",
    "capped",
    "not_written",
    "printable",
    "redact",
    "timestamp",
]

log = logging.getLogger(__name__)

Event = Literal["decision", "outcome"]
Verdict = Literal["allowed", "denied", "error"]
BuiltinPattern = Literal["email", "bearer", "basic", "jwt", "url_credentials", "api_key"]

# Value patterns redacted wherever they appear inside a string argument. Order matters: a bearer
# token is replaced whole before the JWT pattern could leave its scheme behind, and a URL's password
# before the e-mail pattern takes `password@host.tld` for an address.
BUILTIN_PATTERNS: dict[str, re.Pattern[str]] = {
    "bearer": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*"),
    # Shaped as base64 (groups of four), so that most words after "basic" do not match at all.
    "basic": re.compile(
        r"(?i)\bbasic\s+((?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?)(?![A-Za-z0-9+/=])"
    ),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"),
    # The password of `scheme://user:password@host` (DSNs, proxy and git URLs), up to the last `@`
    # before the path, as URL parsers split it; the user name and the host stay. (Its marker names
    # no needle of a later pattern, which would then scan the string for nothing.)
    "url_credentials": re.compile(r"://([^\s/?#@:]*):[^\s/?#]+@"),
    "api_key": re.compile(
        r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"
        r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"
        r"|\bglpat-[A-Za-z0-9_-]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
        r"|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{35}"
        # `name: value` and `name=value`, also as the name ends a longer one (`client_secret=`,
        # `access_token=`) and quoted as in JSON text (`"password": "..."`).
        r"|(?i:(?:api[_-]?key|secret|token|password|passwd|pwd|passphrase)[\"']?\s*[:=]\s*[\"']?)"
        r"[^\s,;&\"']+"
    ),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
}


def _basic(match: re.Match[str]) -> str:
    # `Basic <base64 of user:password>` is redacted; "basic" before an ordinary word is prose.
    try:
        decoded = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        return match.group()
    return "[REDACTED:basic]" if b":" in decoded else match.group()


Replacement = str | Callable[[re.Match[str]], str]
_REPLACEMENTS: dict[str, Replacement] = {
    "basic": _basic,
    "url_credentials": r"://\g<1>:[REDACTED:url_credentials]@",
}


def builtin_replacement(name: str) -> Replacement:
    """What a match of the built-in pattern `name` is replaced with (for `re.sub`)."""
    return _REPLACEMENTS.get(name, f"[REDACTED:{name}]")


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

# For each built-in pattern, its needle: literals taken from every alternative of the pattern, with
# the same case rule. `bearer` and `basic` ignore case as their patterns do; `url_credentials`
# needs the `@` that ends a URL's user information (`://` alone is in every URL); `api_key` has `k-`
# (sk-, pk-, rk-), `gh?_`, `github_pat_`, `glpat-`, `xox`, `AKIA`, `AIza`, and the names of its
# `name: value` form, case ignored (a `:`, `=` or `_` alone is in too many strings: URLs, times,
# identifiers). Keep them in step with the patterns.
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
DEFAULT_SECRET_ARGUMENTS = [
    "*password*",
    "*passwd*",
    "*pwd*",
    "*passphrase*",
    "*secret*",
    "*token*",
    "*api_key*",
    "*apikey*",
    "*api-key*",
    "*access_key*",
    "*accesskey*",
    "*access-key*",
    "*private_key*",
    "*privatekey*",
    "*private-key*",
    "key",
    "auth",
    "*_auth",
    "*-auth",
    "*authorization",
    "*cookie*",
    "*credential*",
]
_ALL_BUILTIN: tuple[BuiltinPattern, ...] = ("bearer", "basic", "jwt", "url_credentials", "api_key", "email")
REDACTED = "[REDACTED]"
MAX_KNOWN_NAMES = 4096

# Caps, in characters, on what a caller chooses and a record stores (decision 0212): a record is
# evidence of what was asked, not a copy of every payload, and its size must not be the caller's
# choice. Each fits its column (PostgreSQL refuses a longer value, and with it the whole batch).
MAX_STRING = 1024  # each string inside the redacted arguments
MAX_ARGUMENTS = 4096  # the redacted arguments, as stored
MAX_METHOD = 128
MAX_RESOURCE = 512
MAX_UPSTREAM = 256
MAX_RUN_ID = 128
MAX_SESSION_ID = 256
MAX_NAME = 256  # subject, client id
MAX_NAMES = 512  # roles, scopes, actors, upstream actors: the items of each list together
MAX_DETAIL = 512
# What a stored row's canonical JSON (its journal line, the bytes its hash covers) stays under,
# whatever the request: every capped field at its cap, of the characters JSON and UTF-8 grow most.
RECORD_MAX_BYTES = 40 * 1024


class RedactionSettings(BaseModel):
    """What of a call's arguments the audit log may keep (the digest is kept always)."""

    model_config = ConfigDict(extra="forbid")

    # Policy-object patterns (`mcp:vault/*`) whose argument values are all replaced.
    tools: list[str] = Field(default_factory=list)
    # Argument names (at any depth; case-insensitive; `*` globs) whose values are replaced; also the
    # value beside such a name in a `[name, value]` pair (header lists) or a `{"name", "value"}` map.
    arguments: list[str] = Field(default_factory=lambda: list(DEFAULT_SECRET_ARGUMENTS))
    # More names, in addition to `arguments` (so that the defaults stay when names are added).
    extra_arguments: list[str] = Field(default_factory=list)
    # Built-in value patterns redacted inside every string.
    builtin: list[BuiltinPattern] = Field(default_factory=lambda: list(_ALL_BUILTIN))
    # More value patterns (regular expressions), redacted inside every string, in addition to `builtin`.
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


class CheckpointSettings(BaseModel):
    """`audit.checkpoints`: signed heads of the hash chains, in the database and a sink (decision 0215)."""

    model_config = ConfigDict(extra="forbid")

    # The Ed25519 key that signs them; default: audit-checkpoint-key.pem beside the built-in server's
    # signing key (created on first start). Never in the database: it is what a database writer lacks.
    key: Path | None = None
    # A file every checkpoint is appended to (O_APPEND), out of the database writers' reach; default:
    # audit-checkpoints.jsonl beside the key.
    sink: Path | None = None
    # A checkpoint after this many records or this long, whichever comes first, and at shutdown.
    every_records: int = Field(default=10_000, ge=1)
    every_s: float = Field(default=10.0, gt=0)
    # Public keys (base64) of other gateways writing the same log, whose checkpoints `verify` accepts.
    trusted_keys: list[str] = Field(default_factory=list)


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
    # What a stored record survives. `crash` (the default): the gateway process dying, SIGKILL
    # included (SQLite: appended to a journal file, no disk flush, then ingested into SQL in a thread
    # with WAL and synchronous=NORMAL; decision 0210). `power`: a power cut or OS crash too
    # (synchronous=FULL: one flush per group commit, milliseconds on most disks).
    durability: Literal["crash", "power"] = "crash"
    redact: RedactionSettings = Field(default_factory=RedactionSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)


# Not frozen: a frozen dataclass sets each of its 28 fields through object.__setattr__, which
# makes building a record four times dearer (two records per call). Nothing changes a record
# once built; the sink reads it once.
@dataclass(slots=True)
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


def capped(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its start and `…[truncated N chars]` (N: how
    many were cut), `limit` characters in all (`limit` must leave room for the marker)."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"…[truncated {len(text)} chars]")
    return f"{text[:keep]}…[truncated {len(text) - keep} chars]"


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


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escaped(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    if code > 0xFFFF:  # as JSON writes it: a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def printable(text: str, *, in_json: bool = False) -> str:
    r"""`text` as it may be shown to a person: every character that is not printable escaped.

    Not printable (`str.isprintable`): control characters (C0, DEL, C1), format characters (bidi
    overrides and isolates, zero-width characters, tags), line and paragraph separators, spaces
    other than the space, surrogates, private and unassigned code points. Each becomes `\n`, `\r`,
    `\t` or `\uXXXX` (a surrogate pair past U+FFFF), and a backslash `\\`, so that what is shown is
    one line, cannot move the cursor or reorder text, and says which characters were there.
    With `in_json`, `text` is JSON (whose strings already escape backslashes) and stays JSON that
    decodes to the same values.
    """
    if text.isprintable() and (in_json or "\\" not in text):
        return text
    return "".join(
        char if char.isprintable() and (in_json or char != "\\") else _escaped(char) for char in text
    )


# The formatted second of the last timestamp: records come many per second, and datetime's
# strftime is most of a timestamp's cost. One tuple, replaced whole, so threads may share it.
_second: tuple[float, str] = (float("nan"), "")


def timestamp(epoch: float) -> str:
    """UTC time in one fixed-width format, so that string order is time order in every database.

    The same string as `datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")`:
    microseconds rounded half to even as `fromtimestamp` rounds them, carried into the second.

    Raises:
        ValueError: `epoch` is not a number, or its year is beyond 1 to 9999.
        OverflowError: `epoch` is beyond the platform's `time_t`.
    """
    global _second
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:
        whole -= 1.0
        micros += 1_000_000
    second = _second
    if second[0] != whole:
        second = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{second[1]}{micros:06d}Z"


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


def not_written(record: AuditRecord, *, exc_info: bool = True, why: str | None = None) -> None:
    """Log a record that could not be written (never its arguments: they may hold secrets); `why`
    says it in one line where a traceback would tell nothing more (the sink refused it)."""
    log.error(
        "audit record not written: %s %s %s %s%s",
        record.event,
        record.decision,
        record.request_id,
        printable(record.resource),
        f" ({printable(why)})" if why else "",
        exc_info=exc_info,
    )
