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
    ├── Unauthenticated (401, -32001)     no or bad credentials; carries the OAuth challenge
    ├── Forbidden (403, -32003)           denied by policy (same text whether or not the thing exists)
    │   └── InsufficientScope (403, -32003)
    ├── BudgetExceeded (429, -32029)      names the budget and when it resets
    ├── UpstreamError (502, -32603)       upstream down or answered garbage
    │   └── UpstreamTimeout (504, -32603)
    ├── CredentialError (502, -32603)     no upstream credential could be obtained
    │   └── UpstreamUnauthorized (502)    the upstream refused the gateway's credential (HTTP 401)
    └── Unavailable (503, -32603)         a store the gateway must consult is unreachable (fail closed)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "BudgetExceeded",
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
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnauthorized",
]


class GatewayError(Exception):
    """Base of every error the gateway answers with; the message is safe to show the caller."""

    http_status: ClassVar[int] = 500
    jsonrpc_code: ClassVar[int] = -32603
    # Short machine-readable reason for audit records and OpenAI-style error types.
    reason: ClassVar[str] = "internal_error"

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


class BudgetExceeded(GatewayError):
    http_status = 429
    jsonrpc_code = -32029
    reason = "budget_exceeded"


class UpstreamError(GatewayError):
    http_status = 502
    reason = "upstream_error"


class UpstreamTimeout(UpstreamError):
    http_status = 504
    reason = "upstream_timeout"


class CredentialError(GatewayError):
    http_status = 502
    reason = "credential_error"


class UpstreamUnauthorized(CredentialError):
    """The upstream answered 401 to the credential the gateway sent. The credentials stage drops that
    credential and retries once with a fresh one; a caller never sees the upstream's 401 (it would
    read as "your token is bad" and invite token passthrough)."""

    reason = "upstream_unauthorized"


class Unavailable(GatewayError):
    http_status = 503
    reason = "unavailable"
