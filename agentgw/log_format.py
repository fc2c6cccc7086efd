"""How the gateway's log lines look: text (the default) or JSON lines (`log_format: json`).

Every line has the time, level, logger and message; a line written while the pipeline runs a call
also names it (`request_id`, the `principal`'s subject once known, the call's `protocol` and
`resource`, and its `trace_id` once tracing sets one), from `agentgw.call.current_call`. What the code
passes as `extra=` is printed too, in both formats (text: ` key=value` after the message).

No line carries a secret: the code never logs one, and each line is also passed through the audit
log's value patterns (bearer and basic credentials, JWTs, URL passwords, API keys) before it is
written, as a second line of defence for what a library or an exception message might quote.
Caller-chosen strings (the resource) are capped, and escaped in text lines so that none can forge one.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from agentgw.call import current_call
from agentgw.records.audit import BUILTIN_PATTERNS, MAX_RESOURCE, builtin_replacement, capped, printable

__all__ = ["LogFormat", "LogFormatter", "configure_logging", "scrubbed"]

LogFormat = Literal["text", "json"]

# Every attribute a `LogRecord` has of its own; any other was passed as `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# The audit log's patterns for credentials (not e-mail addresses: a log line may name a user).
_SECRET_PATTERNS = [
    (BUILTIN_PATTERNS[name], builtin_replacement(name))
    for name in ("bearer", "basic", "jwt", "url_credentials", "api_key")
]


def scrubbed(text: str) -> str:
    """`text` with every credential the audit log's value patterns find replaced."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _json_default(value: Any) -> str:
    return str(value)


class LogFormatter(logging.Formatter):
    """Formats a record as one text line or one JSON object, with the current call's fields."""

    def __init__(self, style: LogFormat = "text") -> None:
        super().__init__()
        self.style = style

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The call's fields and the record's `extra=` values, in the order they are printed."""
        out: dict[str, Any] = {}
        call = current_call.get()
        if call is not None:
            out["request_id"] = call.request_id
            if call.principal is not None:
                out["principal"] = call.principal.subject
            out["protocol"] = call.protocol
            out["resource"] = capped(call.resource, MAX_RESOURCE)
            if call.trace_id is not None:
                out["trace_id"] = call.trace_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                out[key] = value
        return out

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        when = datetime.fromtimestamp(record.created, UTC)
        fields = self.fields(record)
        failure = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        if record.stack_info:
            failure = f"{failure}\n{self.formatStack(record.stack_info)}" if failure else record.stack_info
        if self.style == "json":
            line: dict[str, Any] = {
                "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
            # The record's own keys win: an `extra=` of the same name must not overwrite them.
            line.update({k: v for k, v in fields.items() if k not in line})
            if failure:
                line["exc_info"] = failure
            text = orjson.dumps(line, default=_json_default).decode()
        else:
            parts = [when.strftime("%Y-%m-%d %H:%M:%S,") + f"{when.microsecond // 1000:03d}"]
            parts += [record.levelname, record.name, message]
            parts += [f"{key}={_shown(value)}" for key, value in fields.items()]
            text = " ".join(parts)
            if failure:
                text = f"{text}\n{failure}"
        return scrubbed(text)


def _shown(value: Any) -> str:
    # Plain when it cannot be taken for more than one value; else quoted, every character that is
    # not printable escaped (as `printable` does for audit records), so a value cannot forge a line.
    text = value if isinstance(value, str) else str(value)
    if text and printable(text) == text and not any(c in text for c in ' "='):
        return text
    return '"' + printable(text).replace('"', '\\"') + '"'


def configure_logging(level: str, style: LogFormat) -> None:
    """Send every logger's lines to stderr in `style`, at `level` and above, unless the process's
    logging is set up already (as `logging.basicConfig` does)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogFormatter(style))
        root.addHandler(handler)
    root.setLevel(level)
