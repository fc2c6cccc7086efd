"""The audit records and settings that the audit stage, its storage and its readers share.

`AuditRecord` is what the stage builds and the storage chains and stores; `AuditSettings` is the
`audit:` section of the config file, read by settings, the stage and the storage. The caps, the
redaction patterns, `capped`, `printable` and `timestamp` are here because the CLI, the admin API and
the log formatter show and filter what the records hold with the same rules the stage wrote them by.

Every string a caller chooses is capped where the record is built (`capped`: its start and a marker
saying how much was cut), so that a record stays under `RECORD_MAX_BYTES` whatever the request
(decision 0212). Records are stored as they came, control characters included; whatever shows them
to a person escapes them with `printable`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BUILTIN_PATTERNS",
    "DEFAULT_SECRET_ARGUMENTS",
    "MAX_ARGUMENTS",
    "MAX_DETAIL",
    "MAX_METHOD",
    "MAX_NAME",
    "MAX_NAMES",
    "MAX_RESOURCE",
    "MAX_RUN_ID",
    "MAX_SESSION_ID",
    "MAX_STRING",
    "MAX_UPSTREAM",
    "RECORD_MAX_BYTES",
    "AuditRecord",
    "AuditSettings",
    "BuiltinPattern",
    "CheckpointSettings",
    "Event",
    "RedactionSettings",
    "Replacement",
    "Verdict",
    "builtin_replacement",
    "capped",
    "not_written",
    "printable",
    "timestamp",
]

# A record that cannot be written is logged under the audit stage's name, wherever that happened,
# so that one logger name finds every lost record.
log = logging.getLogger("agentgw.filters.audit")

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
    # (synchronous=FULL: one disk flush per group commit).
    durability: Literal["crash", "power"] = "crash"
    redact: RedactionSettings = Field(default_factory=RedactionSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)


# Not frozen: a frozen dataclass sets every field through object.__setattr__, which makes building
# a record (two per call) several times dearer. Nothing changes a record once built; the sink reads
# it once.
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


def capped(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its start and `…[truncated N chars]` (N: how
    many were cut), `limit` characters in all (`limit` must leave room for the marker)."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"…[truncated {len(text)} chars]")
    return f"{text[:keep]}…[truncated {len(text) - keep} chars]"


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
