"""One error tree for the whole gateway. Each class knows its HTTP status and JSON-RPC code;
ingress adapters render it in their protocol's own shape.

    GatewayError (500, -32603)
    ├── BadRequest (400, -32600)
    │   ├── ParseError (400, -32700)
    │   ├── PayloadTooLarge (413, -32600)
    │   ├── UnsupportedMediaType (415, -32600)
    │   ├── HeaderMismatch (400, -32020)
    │   └── InvalidRunId (400, -32602)     the run id a caller sent is not one (`call.checked_run_id`)
    ├── NotFound (404, -32601)            unknown server or tool (never says which is hidden)
    │   └── SessionNotFound (404, -32600) unknown or foreign session: the client starts a new one
    ├── TooManySessions (429, -32600)     the caller holds as many legacy MCP sessions as it may
    ├── Unauthenticated (401, -32001)     no or bad credentials; carries the OAuth challenge
    ├── Forbidden (403, -32003)           denied by policy (same text whether or not the thing exists)
    │   ├── InsufficientScope (403, -32003)
    │   └── ToolQuarantined (403, -32003) a pinned tool, prompt or template changed (or waits): approve it
    ├── BudgetExceeded (429, -32029)      names the budget and when it resets
    ├── UpstreamError (502, -32603)       the upstream failed after the call may have reached it
    │   ├── UpstreamTimeout (504, -32603)
    │   ├── UpstreamFailed (502, -32603)  the upstream answered HTTP 5xx (never relayed as it is)
    │   ├── UpstreamBusy (503, -32603)    no connection to the upstream free within a short wait
    │   └── UpstreamUnreachable (502)     no connection was made: the call never left the gateway
    ├── CredentialError (502, -32603)     no upstream credential could be obtained
    │   └── UpstreamUnauthorized (502)    the upstream refused the gateway's credential (HTTP 401)
    └── Unavailable (503, -32603)         a store the gateway must consult is unreachable (fail closed)
        └── SessionsExhausted (503)       the gateway holds as many legacy MCP sessions as it may
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "BudgetExceeded",
    "ConfigError",
    "CredentialError",
    "Forbidden",
    "GatewayError",
    "HeaderMismatch",
    "InsufficientScope",
    "InvalidRunId",
    "NotFound",
    "ParseError",
    "PayloadTooLarge",
    "SessionNotFound",
    "SessionsExhausted",
    "TooManySessions",
    "ToolQuarantined",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamFailed",
    "UpstreamTimeout",
    "UpstreamUnauthorized",
    "UpstreamUnreachable",
]


class GatewayError(Exception):
    """Base of every error the gateway answers with; the message is safe to show the caller."""

    http_status: ClassVar[int] = 500
    jsonrpc_code: ClassVar[int] = -32603
    # Short machine-readable reason for audit records and OpenAI-style error types.
    reason: ClassVar[str] = "internal_error"
    # Whether the call may have reached its upstream when this was raised. The budget stage charges
    # such a call (the upstream may be working on it) and gives back only one that provably never
    # left the gateway. Only the upstream seam knows, so only it says True; an instance may override
    # the class (an error standing for several attempts, one of which was sent).
    maybe_sent: bool = False

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.data = data


class BadRequest(GatewayError):
    http_status = 400
    jsonrpc_code = -32600
    reason = "invalid_request"


class ParseError(BadRequest):
    jsonrpc_code = -32700
    reason = "parse_error"


class PayloadTooLarge(BadRequest):
    http_status = 413
    reason = "payload_too_large"


class UnsupportedMediaType(BadRequest):
    http_status = 415
    reason = "unsupported_media_type"


class HeaderMismatch(BadRequest):
    jsonrpc_code = -32020
    reason = "header_mismatch"


class InvalidRunId(BadRequest):
    jsonrpc_code = -32602
    reason = "invalid_run_id"


class NotFound(GatewayError):
    http_status = 404
    jsonrpc_code = -32601
    reason = "not_found"


class SessionNotFound(NotFound):
    jsonrpc_code = -32600
    reason = "session_not_found"


class TooManySessions(GatewayError):
    http_status = 429
    jsonrpc_code = -32600
    reason = "too_many_sessions"


class Unauthenticated(GatewayError):
    http_status = 401
    jsonrpc_code = -32001
    reason = "unauthenticated"


class Forbidden(GatewayError):
    http_status = 403
    jsonrpc_code = -32003
    reason = "denied_by_policy"


class InsufficientScope(Forbidden):
    reason = "insufficient_scope"


class ToolQuarantined(Forbidden):
    reason = "tool_quarantined"


class BudgetExceeded(GatewayError):
    http_status = 429
    jsonrpc_code = -32029
    reason = "budget_exceeded"


class UpstreamError(GatewayError):
    """The upstream failed: timed out, broke off, answered garbage or an error. Bytes may have gone
    upstream, so the call counts as sent."""

    http_status = 502
    reason = "upstream_error"
    maybe_sent = True


class UpstreamTimeout(UpstreamError):
    http_status = 504
    reason = "upstream_timeout"


class UpstreamFailed(UpstreamError):
    """The upstream answered with a server error: the caller gets the gateway's own protocol error, not
    the upstream's page (which would read as the gateway failing, and may show the upstream's internals)."""

    reason = "upstream_failed"


class UpstreamBusy(UpstreamError):
    """Every connection the gateway allows itself to the upstream stayed in use for the short wait: the
    call was not sent, and may be retried (`Retry-After`)."""

    http_status = 503
    reason = "upstream_busy"
    maybe_sent = False  # unless it stands for a stream refused after the upstream started it


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made (refused, no such host, connect timeout, not
    connected): nothing of the call was sent."""

    maybe_sent = False


class CredentialError(GatewayError):
    http_status = 502
    reason = "credential_error"


class UpstreamUnauthorized(CredentialError):
    """The upstream answered 401 to the credential the gateway sent. The credentials stage drops that
    credential and retries once with a fresh one; a caller never sees the upstream's 401 (it would
    read as "your token is bad" and invite token passthrough)."""

    reason = "upstream_unauthorized"
    maybe_sent = True  # the upstream received the call and refused it


class Unavailable(GatewayError):
    http_status = 503
    reason = "unavailable"


class SessionsExhausted(Unavailable):
    reason = "sessions_exhausted"


class ConfigError(ValueError):
    """The config file or environment cannot be turned into settings.

    Not a call error (no status, no JSON-RPC code): it stops the gateway from starting, and lives
    here so that every room can raise it without importing `settings`, which imports them all.
    """
