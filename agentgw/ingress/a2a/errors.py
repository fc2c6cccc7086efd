"""A2A's errors and how the gateway's errors look to an A2A caller.

A2A's own errors keep A2A's codes (TaskNotFound -32001 ... VersionNotSupported -32009) and are
subclasses of the gateway's tree, so the stages and the audit record treat them like any other. The
gateway's own refusals use codes that cannot be mistaken for A2A's: denied by policy -32043,
unauthenticated -32041 (with HTTP 401/403 and the OAuth challenge), budget -32029. Over JSON-RPC,
errors are HTTP 200 except those the transport must see (401, 403 for scope, 404 unknown agent, 413,
415); over HTTP+JSON, they are the HTTP status with a `google.rpc.Status` body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

from agentgw.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InsufficientScope,
    NotFound,
    ParseError,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
    UpstreamError,
)
from agentgw.registry.a2a import Generation

__all__ = [
    "A2aProtocolError",
    "AgentNotFound",
    "InvalidAgentResponse",
    "InvalidParams",
    "MethodNotFound",
    "TaskNotFound",
    "UnsupportedOperation",
    "VersionNotSupported",
    "jsonrpc_error",
    "jsonrpc_error_response",
    "rest_error",
    "rest_error_response",
]

log = logging.getLogger(__name__)

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
A2A_DOMAIN = "a2a-protocol.org"
GATEWAY_DOMAIN = "agentgw"


class A2aProtocolError(GatewayError):
    """An error A2A defines; `a2a_reason` is its `ErrorInfo.reason`, `grpc_status` its REST status."""

    a2a_reason: ClassVar[str] = "INTERNAL_ERROR"
    grpc_status: ClassVar[str] = "INTERNAL"
    # The error's name in 0.3 HTTP+JSON error bodies (`{"type": ..., "message": ...}`).
    legacy_type: ClassVar[str] = "InternalError"


class AgentNotFound(NotFound):
    """No agent of that name is configured (or it is disabled)."""

    reason = "agent_not_found"


class TaskNotFound(NotFound, A2aProtocolError):
    jsonrpc_code = -32001
    reason = "task_not_found"
    a2a_reason = "TASK_NOT_FOUND"
    grpc_status = "NOT_FOUND"
    legacy_type = "TaskNotFoundError"


class MethodNotFound(NotFound, A2aProtocolError):
    jsonrpc_code = -32601
    reason = "method_not_found"
    a2a_reason = "METHOD_NOT_FOUND"
    grpc_status = "NOT_FOUND"
    legacy_type = "MethodNotFoundError"


class InvalidParams(BadRequest, A2aProtocolError):
    jsonrpc_code = -32602
    reason = "invalid_params"
    a2a_reason = "INVALID_PARAMS"
    grpc_status = "INVALID_ARGUMENT"
    legacy_type = "InvalidParamsError"


class UnsupportedOperation(BadRequest, A2aProtocolError):
    jsonrpc_code = -32004
    reason = "unsupported_operation"
    a2a_reason = "UNSUPPORTED_OPERATION"
    grpc_status = "FAILED_PRECONDITION"
    legacy_type = "UnsupportedOperationError"


class VersionNotSupported(BadRequest, A2aProtocolError):
    jsonrpc_code = -32009
    reason = "version_not_supported"
    a2a_reason = "VERSION_NOT_SUPPORTED"
    grpc_status = "FAILED_PRECONDITION"
    legacy_type = "VersionNotSupportedError"


class InvalidAgentResponse(UpstreamError, A2aProtocolError):
    jsonrpc_code = -32006
    reason = "invalid_agent_response"
    a2a_reason = "INVALID_AGENT_RESPONSE"
    grpc_status = "INTERNAL"
    legacy_type = "InvalidAgentResponseError"


# The gateway's generic codes -32001 and -32003 are A2A's TaskNotFound and PushNotificationNotSupported:
# an A2A client would misread them, so A2A answers carry these instead.
_GATEWAY_CODES: tuple[tuple[type[GatewayError], int], ...] = ((Forbidden, -32043), (Unauthenticated, -32041))
# Refusals the HTTP transport itself must show (OAuth challenges, routing, body limits).
_HTTP_LEVEL = (Unauthenticated, InsufficientScope, AgentNotFound, PayloadTooLarge, UnsupportedMediaType)
_GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_BASIC_JSONRPC = {-32700: "PARSE_ERROR", -32600: "INVALID_REQUEST", -32603: "INTERNAL_ERROR"}


def _gateway_error(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    # A crash is an internal error, never a pass; the caller learns nothing of its cause.
    log.error("internal error while handling an A2A request", exc_info=exc)
    return GatewayError("internal error")


def _jsonrpc_code(exc: GatewayError) -> int:
    if not isinstance(exc, A2aProtocolError):
        for cls, code in _GATEWAY_CODES:
            if isinstance(exc, cls):
                return code
    return exc.jsonrpc_code


def _error_info(exc: GatewayError) -> dict[str, Any]:
    if isinstance(exc, A2aProtocolError):
        reason, domain = exc.a2a_reason, A2A_DOMAIN
    elif exc.jsonrpc_code in _BASIC_JSONRPC and not isinstance(exc, (Forbidden, Unauthenticated)):
        reason, domain = _BASIC_JSONRPC[exc.jsonrpc_code], A2A_DOMAIN
    else:
        reason, domain = exc.reason.upper(), GATEWAY_DOMAIN
    # google.rpc.ErrorInfo metadata is a string map: what the error carries (a budget's name, limit
    # and reset time) travels as strings.
    data = exc.data if isinstance(exc.data, Mapping) else {}
    metadata = {
        str(k): v if isinstance(v, str) else orjson.dumps(v).decode()
        for k, v in data.items()
        if v is not None
    }
    return {"@type": ERROR_INFO, "reason": reason, "domain": domain, "metadata": metadata}


def jsonrpc_error(rpc_id: Any, exc: GatewayError, generation: Generation = "1.0") -> dict[str, Any]:
    """A JSON-RPC error response for `exc` (1.0 answers carry an `ErrorInfo` in `data`)."""
    error: dict[str, Any] = {"code": _jsonrpc_code(exc), "message": exc.message}
    if generation == "1.0":
        error["data"] = [_error_info(exc)]
    return {"jsonrpc": "2.0", "id": rpc_id, "error": error}


def rest_error(exc: GatewayError, generation: Generation = "1.0") -> dict[str, Any]:
    """An HTTP+JSON error body (`google.rpc.Status` with an `ErrorInfo`) for `exc`; for 0.3 callers,
    also the 0.3 fields `type` and `message` when A2A names the error."""
    status = exc.grpc_status if isinstance(exc, A2aProtocolError) else None
    body: dict[str, Any] = {
        "error": {
            "code": exc.http_status,
            "status": status or _GRPC_STATUS.get(exc.http_status, "INTERNAL"),
            "message": exc.message,
            "details": [_error_info(exc)],
        }
    }
    legacy = _legacy_type(exc)
    if generation == "0.3" and legacy is not None:
        body |= {"type": legacy, "message": exc.message}
    return body


def _legacy_type(exc: GatewayError) -> str | None:
    if isinstance(exc, A2aProtocolError):
        return exc.legacy_type
    if isinstance(exc, ParseError):
        return "JSONParseError"
    if isinstance(exc, (Forbidden, Unauthenticated)) or exc.jsonrpc_code not in _BASIC_JSONRPC:
        return None
    return "InvalidRequestError" if isinstance(exc, BadRequest) else "InternalError"


def jsonrpc_error_response(rpc_id: Any, exc: BaseException, generation: Generation = "1.0") -> Response:
    """`exc` as a JSON-RPC answer: HTTP 200 unless the transport must see the refusal."""
    error = _gateway_error(exc)
    status = error.http_status if isinstance(error, _HTTP_LEVEL) else 200
    body = orjson.dumps(jsonrpc_error(rpc_id, error, generation))
    return Response(body, status_code=status, headers=error.headers, media_type="application/json")


def rest_error_response(exc: BaseException, generation: Generation = "1.0") -> Response:
    """`exc` as an HTTP+JSON answer: its HTTP status and a `google.rpc.Status` body."""
    error = _gateway_error(exc)
    body = orjson.dumps(rest_error(error, generation))
    return Response(body, status_code=error.http_status, headers=error.headers, media_type="application/json")
