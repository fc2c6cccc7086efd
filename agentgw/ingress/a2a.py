"""A2A agents behind the gateway: `/a2a/<agent>`, JSON-RPC and HTTP+JSON, A2A 1.0 and 0.3.

Routes (the agent's gateway URL is `<base>/a2a/<agent>`; the rewritten card lists it for both bindings):
    GET  /a2a/<agent>/.well-known/agent-card.json   the agent's card, rewritten for the caller
    POST /a2a/<agent>                               JSON-RPC (1.0 `SendMessage`..., 0.3 `message/send`...)
    *    /a2a/<agent>/<path>                        HTTP+JSON: 1.0 paths (`message:send`, `tasks/{id}`,
                                                    optionally after a tenant segment), 0.3 under `v1/`

Every request is one `Call(protocol="a2a")` through the one pipeline:
    card, GetExtendedAgentCard   action `list` on `a2a:<agent>`; `Reply.listing` names every skill as
                                 `a2a:<agent>/<skill>`, the policy stage narrows it, and the card the
                                 caller gets lists only the skills still named.
    SendMessage (+ streaming)    action `send` on `a2a:<agent>/<skill>`.
    task reads and control       action `call` on `a2a:<agent>/task/<op>`, op one of `get`, `list`,
                                 `cancel`, `subscribe`, `push-config`. Skill ids are percent-encoded
                                 outside `[A-Za-z0-9_.~-]`, so no skill can be named `task/...`.
The skill of a message is `metadata.skill` of the request or of the message (they must agree), else
the agent's configured `default_skill` (then written into the forwarded request's metadata, so the
agent runs the skill policy allowed); a message with neither is refused (-32602) before the pipeline,
and one whose skill policy does not allow is refused by it: neither reaches the agent.
`Call.run_id` is the `Agent-Run-Id` header, else the message's `contextId`, so budgets per run count
an agent-to-agent conversation; `Call.session_id` is the task id (from the request, or the first
task the agent's answer names), so audit records carry both. `Call.endpoint` is `/a2a/<agent>`.

The gateway keeps task ownership: a task the agent creates for a caller belongs to that caller's
subject, and reading, listing, cancelling, subscribing to, configuring pushes for, continuing or
referencing a task that is not the caller's own is `TaskNotFound`, exactly as for a task that does
not exist (both JSON spellings of a field are read: agents parse protobuf JSON, which takes `taskId`
and `task_id` alike). `ListTasks` answers keep only the caller's tasks. Context ids are not owned:
agents pass them along a chain of calls on purpose (that is what per-context budgets count).

Versions: `A2A-Version` 1.x is 1.0, 0.3.x or no header is 0.3, anything else is -32009. Requests go
to the agent's interface of the same binding and generation (the method names and paths say which):
bodies are forwarded as bytes, answers relayed as they arrive, SSE event by event. Decisions are
written up in docs/decisions/0400-0402.

Errors keep A2A's codes (TaskNotFound -32001 ... VersionNotSupported -32009). The gateway's own
refusals use codes that cannot be mistaken for them: denied by policy -32043, unauthenticated
-32041 (with HTTP 401/403 and the OAuth challenge), budget -32029. Over JSON-RPC, errors are HTTP 200
except those the transport must see (401, 403 for scope, 404 unknown agent, 413, 415); over
HTTP+JSON, they are the HTTP status with a `google.rpc.Status` body. A stream that the agent breaks
off, or ends before the task reaches a final or interrupted state, ends with an `error` event.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol
from urllib.parse import quote

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from agentgw.call import RUN_ID_HEADER, Action, Call, Reply, Usage, checked_run_id
from agentgw.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    GatewayError,
    InsufficientScope,
    InvalidRunId,
    NotFound,
    ParseError,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from agentgw.ingress.a2a_signatures import CardSigner, UpstreamCardVerifier
from agentgw.ingress.body import read_body
from agentgw.pipeline import Pipeline
from agentgw.registry.a2a import (
    A2aAgentSpec,
    A2aConfigError,
    A2aRegistry,
    CardSignatureInvalid,
    CardUnavailable,
    UpstreamCard,
    card_skill_ids,
    version_of,
)
from agentgw.registry.secrets import Secrets
from agentgw.upstream.a2a import A2aHttpUpstream, forwarded_headers
from agentgw.upstream.http import (
    DEFAULT_LIMITS,
    AnswerTooLarge,
    HttpClient,
    Limits,
    UpstreamResponse,
    UpstreamState,
)

__all__ = [
    "SKILL_KEY",
    "A2aIngress",
    "A2aRequest",
    "AgentNotFound",
    "CardSecurity",
    "InvalidAgentResponse",
    "InvalidParams",
    "MemoryTaskOwners",
    "MethodNotFound",
    "TaskNotFound",
    "TaskOwners",
    "UnsupportedOperation",
    "VersionNotSupported",
    "answer_task_ids",
    "is_final",
    "parse_jsonrpc",
    "parse_rest",
    "requested_version",
    "rewrite_card",
    "skill_object",
    "task_object",
]

log = logging.getLogger(__name__)

SKILL_KEY = "skill"
JSON_TYPES = ("application/json", "application/a2a+json")
MAX_EVENT_BYTES = 8 * 1024 * 1024
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
A2A_DOMAIN = "a2a-protocol.org"
GATEWAY_DOMAIN = "agentgw"

Generation = Literal["1.0", "0.3"]
Binding = Literal["jsonrpc", "rest"]


# --- errors in A2A's terms (subclasses of the gateway's tree, with A2A's codes) --------------------


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


def _jsonrpc_error_response(rpc_id: Any, exc: BaseException, generation: Generation = "1.0") -> Response:
    error = _gateway_error(exc)
    status = error.http_status if isinstance(error, _HTTP_LEVEL) else 200
    body = orjson.dumps(jsonrpc_error(rpc_id, error, generation))
    return Response(body, status_code=status, headers=error.headers, media_type="application/json")


def _rest_error_response(exc: BaseException, generation: Generation = "1.0") -> Response:
    error = _gateway_error(exc)
    body = orjson.dumps(rest_error(error, generation))
    return Response(body, status_code=error.http_status, headers=error.headers, media_type="application/json")


# --- versions and operations ----------------------------------------------------------------------


def requested_version(headers: Mapping[str, str]) -> Generation:
    """The A2A version a request asks for: `A2A-Version` 1.x -> 1.0; 0.3.x or none -> 0.3.

    Raises:
        VersionNotSupported: any other version.
    """
    value = headers.get("a2a-version", "").strip()
    generation = version_of(value)
    if generation is None:
        raise VersionNotSupported(f"A2A version {value!r} is not supported: use 1.0 or 0.3")
    return generation


@dataclass(frozen=True, slots=True)
class _Op:
    name: str  # the 1.0 method name (or the 0.3 one, over 0.3 JSON-RPC): for audit
    kind: str  # send, get, list, cancel, subscribe, push-config, card
    generation: Generation
    streaming: bool = False
    # Where a task operation's task id is in JSON-RPC params.
    task_key: str | None = None


_JSONRPC_OPS: dict[str, _Op] = {
    op.name: op
    for op in (
        _Op("SendMessage", "send", "1.0"),
        _Op("SendStreamingMessage", "send", "1.0", streaming=True),
        _Op("GetTask", "get", "1.0", task_key="id"),
        _Op("ListTasks", "list", "1.0"),
        _Op("CancelTask", "cancel", "1.0", task_key="id"),
        _Op("SubscribeToTask", "subscribe", "1.0", streaming=True, task_key="id"),
        _Op("CreateTaskPushNotificationConfig", "push-config", "1.0", task_key="taskId"),
        _Op("GetTaskPushNotificationConfig", "push-config", "1.0", task_key="taskId"),
        _Op("ListTaskPushNotificationConfigs", "push-config", "1.0", task_key="taskId"),
        _Op("DeleteTaskPushNotificationConfig", "push-config", "1.0", task_key="taskId"),
        _Op("GetExtendedAgentCard", "card", "1.0"),
        _Op("message/send", "send", "0.3"),
        _Op("message/stream", "send", "0.3", streaming=True),
        _Op("tasks/get", "get", "0.3", task_key="id"),
        _Op("tasks/cancel", "cancel", "0.3", task_key="id"),
        _Op("tasks/resubscribe", "subscribe", "0.3", streaming=True, task_key="id"),
        _Op("tasks/pushNotificationConfig/set", "push-config", "0.3", task_key="taskId"),
        _Op("tasks/pushNotificationConfig/get", "push-config", "0.3", task_key="id"),
        _Op("tasks/pushNotificationConfig/list", "push-config", "0.3", task_key="id"),
        _Op("tasks/pushNotificationConfig/delete", "push-config", "0.3", task_key="id"),
        _Op("agent/getAuthenticatedExtendedCard", "card", "0.3"),
    )
}

_ID = r"(?P<id>[^/]+)"
_PUSH = rf"tasks/{_ID}/pushNotificationConfigs"
# (HTTP method, path pattern, operation); 1.0 paths may follow a tenant segment, 0.3 paths are under v1/.
_REST_1_0: tuple[tuple[str, str, _Op], ...] = (
    ("POST", "message:send", _Op("SendMessage", "send", "1.0")),
    ("POST", "message:stream", _Op("SendStreamingMessage", "send", "1.0", streaming=True)),
    ("GET", "tasks", _Op("ListTasks", "list", "1.0")),
    ("POST", rf"tasks/{_ID}:cancel", _Op("CancelTask", "cancel", "1.0")),
    ("GET", rf"tasks/{_ID}:subscribe", _Op("SubscribeToTask", "subscribe", "1.0", streaming=True)),
    ("POST", rf"tasks/{_ID}:subscribe", _Op("SubscribeToTask", "subscribe", "1.0", streaming=True)),
    ("GET", rf"{_PUSH}/[^/]+", _Op("GetTaskPushNotificationConfig", "push-config", "1.0")),
    ("DELETE", rf"{_PUSH}/[^/]+", _Op("DeleteTaskPushNotificationConfig", "push-config", "1.0")),
    ("POST", _PUSH, _Op("CreateTaskPushNotificationConfig", "push-config", "1.0")),
    ("GET", _PUSH, _Op("ListTaskPushNotificationConfigs", "push-config", "1.0")),
    ("GET", rf"tasks/{_ID}", _Op("GetTask", "get", "1.0")),
    ("GET", "extendedAgentCard", _Op("GetExtendedAgentCard", "card", "1.0")),
)
_REST_0_3: tuple[tuple[str, str, _Op], ...] = tuple(
    (method, "v1/" + ("card" if op.kind == "card" else pattern), _Op(op.name, op.kind, "0.3", op.streaming))
    for method, pattern, op in _REST_1_0
    if op.kind != "list"  # 0.3 has no ListTasks
)
_REST_ROUTES: tuple[tuple[str, re.Pattern[str], _Op], ...] = (
    *((m, re.compile(p), op) for m, p, op in _REST_0_3),
    *((m, re.compile(r"(?:[^/]+/)?" + p), op) for m, p, op in _REST_1_0),
)


def _spellings(obj: Mapping[str, Any], name: str) -> list[Any]:
    """Every value of field `name` in `obj`, under its JSON name and its proto field name.

    Agents parse requests with protobuf JSON (or pydantic with aliases), which accepts `taskId` and
    `task_id` alike: a check that read one spelling could be walked around with the other.
    """
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return [obj[key] for key in dict.fromkeys((name, snake)) if key in obj]


def _strings(values: Iterable[Any]) -> list[str]:
    return [v for v in values if isinstance(v, str) and v]


@dataclass(slots=True)
class A2aRequest:
    """One A2A request, read just enough to classify it; `body` is forwarded unchanged.

    Attributes:
        binding: `jsonrpc` or `rest`.
        op: the operation (see `_Op`).
        rpc_id: the JSON-RPC id (None over HTTP+JSON).
        params: JSON-RPC params, or the HTTP+JSON body (`{}` when there is none).
        task_ids: the task a task operation is about (more than one only if spellings disagree).
        body: the bytes to forward.
        http_method: the HTTP method to forward with.
        suffix: HTTP+JSON: the raw path after `/a2a/<agent>` and the query string, forwarded as is.
    """

    binding: Binding
    op: _Op
    rpc_id: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)
    task_ids: list[str] = field(default_factory=list)
    body: bytes | None = None
    http_method: str = "POST"
    suffix: str = ""

    @property
    def messages(self) -> list[Mapping[str, Any]]:
        """The message of a send (`message`, or `request` in the 0.3 HTTP+JSON body)."""
        found = [*_spellings(self.params, "message"), *_spellings(self.params, "request")]
        return [m for m in found if isinstance(m, Mapping)]

    @property
    def context_id(self) -> str | None:
        values = _strings(v for m in self.messages for v in _spellings(m, "contextId"))
        return values[0] if values else None

    def task_refs(self) -> list[str]:
        """Every task the request is about or refers to; each must be the caller's own."""
        if self.op.kind != "send":
            return list(self.task_ids)
        refs: list[Any] = []
        for message in self.messages:
            refs += _spellings(message, "taskId")
            for listed in _spellings(message, "referenceTaskIds"):
                refs += listed if isinstance(listed, list) else []
        return list(dict.fromkeys(_strings(refs)))

    def skill(self, default: str | None) -> str | None:
        """The skill a message is for: `metadata.skill` of the request or message, else `default`.

        Raises:
            InvalidParams: the metadata objects name different skills, or the value is not a string.
        """
        named = []
        for metadata in (self.params.get("metadata"), *(m.get("metadata") for m in self.messages)):
            if isinstance(metadata, Mapping) and metadata.get(SKILL_KEY) is not None:
                value = metadata[SKILL_KEY]
                if not isinstance(value, str) or not value:
                    raise InvalidParams(f"metadata.{SKILL_KEY} must be a non-empty string")
                named.append(value)
        if len(set(named)) > 1:
            raise InvalidParams(f"the request and its message name different skills in metadata.{SKILL_KEY}")
        return named[0] if named else default

    def name_skill(self, skill: str) -> None:
        """Put `skill` in the request's metadata, in the body forwarded too (the only rewrite of a body)."""
        params = dict(self.params)
        params["metadata"] = {**(params.get("metadata") or {}), SKILL_KEY: skill}
        self.params = params
        if self.binding == "jsonrpc":
            assert self.body is not None
            envelope = orjson.loads(self.body)
            envelope["params"] = params
            self.body = orjson.dumps(envelope)
        else:
            self.body = orjson.dumps(params)


def _check_send_params(request: A2aRequest) -> None:
    messages = request.messages
    if not messages:
        raise InvalidParams("invalid params: a message object is required")
    for message in messages:
        for name in ("taskId", "contextId"):
            if any(v is not None and not isinstance(v, str) for v in _spellings(message, name)):
                raise InvalidParams(f"invalid params: message.{name} must be a string")
        for refs in _spellings(message, "referenceTaskIds"):
            if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
                raise InvalidParams("invalid params: message.referenceTaskIds must be a list of strings")
        if message.get("metadata") is not None and not isinstance(message["metadata"], Mapping):
            raise InvalidParams("invalid params: metadata must be an object")
    if request.params.get("metadata") is not None and not isinstance(request.params["metadata"], Mapping):
        raise InvalidParams("invalid params: metadata must be an object")


def parse_jsonrpc(raw: bytes) -> A2aRequest:
    """Parse and classify one JSON-RPC request.

    Raises:
        ParseError: not JSON.
        BadRequest: a batch, or not a JSON-RPC 2.0 request.
        MethodNotFound: a method A2A (1.0 or 0.3) does not define.
        InvalidParams: params that do not fit the method.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ParseError("parse error: the body is not valid JSON") from exc
    if isinstance(body, list):
        raise BadRequest("invalid request: JSON-RPC batches are not supported")
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
        raise BadRequest("invalid request: a JSON-RPC 2.0 request object is required")
    rpc_id = body.get("id")
    if isinstance(rpc_id, bool) or (rpc_id is not None and not isinstance(rpc_id, str | int)):
        raise BadRequest("invalid request: id must be a string, an integer or null")
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise BadRequest("invalid request: method must be a non-empty string")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise InvalidParams("invalid params: params must be an object")
    op = _JSONRPC_OPS.get(method)
    if op is None:
        raise MethodNotFound(f"method not found: {method[:100]!r} is not an A2A method")
    request = A2aRequest("jsonrpc", op, rpc_id=rpc_id, params=params, body=raw)
    if op.task_key is not None:
        values = _spellings(params, op.task_key)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise InvalidParams(f"invalid params: {op.task_key} must be a non-empty string")
        request.task_ids = list(dict.fromkeys(values))
    if op.kind == "send":
        _check_send_params(request)
    return request


def parse_rest(http_method: str, path: str, suffix: str, body: bytes) -> A2aRequest:
    """Classify one HTTP+JSON request; `path` is the decoded path after `/a2a/<agent>/`.

    Raises:
        MethodNotFound: no A2A operation at that path and method.
        ParseError: a body that is not JSON.
        InvalidParams: a body that does not fit the operation.
    """
    if any(segment in (".", "..") for segment in path.split("/")):
        # A dot segment would be resolved on the way out and name another path than the one classified.
        raise MethodNotFound(f"no A2A operation at {http_method} /{path[:200]}")
    for method, pattern, op in _REST_ROUTES:
        match = pattern.fullmatch(path)
        if match is None or method != http_method:
            continue
        params: Any = {}
        if body.strip():
            try:
                params = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ParseError("parse error: the body is not valid JSON") from exc
            if not isinstance(params, dict):
                raise InvalidParams("invalid params: the body must be a JSON object")
        request = A2aRequest(
            "rest", op, params=params, body=body or None, http_method=http_method, suffix=suffix
        )
        if op.kind == "send":
            _check_send_params(request)
        task_id = match.groupdict().get("id")
        if task_id is not None:
            # The path names the task; a body naming one too (push configs) must name one of the caller's.
            request.task_ids = list(dict.fromkeys([task_id, *_strings(_spellings(params, "taskId"))]))
        return request
    raise MethodNotFound(f"no A2A operation at {http_method} /{path[:200]}")


# --- policy objects --------------------------------------------------------------------------------


def _segment(value: str) -> str:
    return quote(value, safe="")


def skill_object(agent: str, skill: str) -> str:
    """`a2a:<agent>/<skill>`, the skill percent-encoded outside `[A-Za-z0-9_.~-]`."""
    return f"a2a:{agent}/{_segment(skill)}"


def task_object(agent: str, kind: str) -> str:
    """`a2a:<agent>/task/<op>` for task reads and control."""
    return f"a2a:{agent}/task/{kind}"


# --- what answers say ----------------------------------------------------------------------------

_FINAL_STATES = frozenset(
    {
        "TASK_STATE_COMPLETED",
        "TASK_STATE_FAILED",
        "TASK_STATE_CANCELED",
        "TASK_STATE_CANCELLED",  # the 0.3 protobuf spelling
        "TASK_STATE_REJECTED",
        "TASK_STATE_INPUT_REQUIRED",
        "TASK_STATE_AUTH_REQUIRED",
        "completed",
        "failed",
        "canceled",
        "rejected",
        "input-required",
        "auth-required",
    }
)
# An answer's wrappers, in every spelling an agent may use: 1.0 and 0.3 protobuf JSON (camelCase, or
# field names), `msg` being the 0.3 field behind the JSON name `message`.
_WRAPPERS = {
    "task": ("task",),
    "message": ("message", "msg"),
    "statusUpdate": ("statusUpdate", "status_update"),
    "artifactUpdate": ("artifactUpdate", "artifact_update"),
}


def _wrapped(result: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    found = [result.get(key) for key in _WRAPPERS[kind]]
    return [f for f in found if isinstance(f, Mapping)]


def _state(obj: Any) -> Any:
    status = obj.get("status") if isinstance(obj, Mapping) else None
    return status.get("state") if isinstance(status, Mapping) else None


def answer_task_ids(result: Any) -> list[str]:
    """The task ids an answer or stream event names (1.0/0.3 `task`/`message`/`statusUpdate`/
    `artifactUpdate` wrappers, or a 0.3 JSON-RPC object with `kind`)."""
    if not isinstance(result, Mapping):
        return []
    found: list[Any] = [t.get("id") for t in _wrapped(result, "task")]
    for wrapper in ("message", "statusUpdate", "artifactUpdate"):
        for inner in _wrapped(result, wrapper):
            found += _spellings(inner, "taskId")
    kind = result.get("kind")
    if kind == "task":
        found.append(result.get("id"))
    elif kind in ("message", "status-update", "artifact-update"):
        found += _spellings(result, "taskId")
    return list(dict.fromkeys(_strings(found)))


def is_final(result: Any) -> bool:
    """Whether a stream event ends the exchange: a message, or a task in a final or interrupted state."""
    if not isinstance(result, Mapping):
        return False
    kind = result.get("kind")
    if _wrapped(result, "message") or kind == "message":
        return True
    updates = _wrapped(result, "statusUpdate")
    if result.get("final") is True or any(u.get("final") is True for u in updates):
        return True
    candidates = [*_wrapped(result, "task"), *updates, result if kind else None]
    return any(_state(c) in _FINAL_STATES for c in candidates)


# --- card rewriting (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardSecurity:
    """How the rewritten card tells callers to authenticate: to the gateway, never to the agent.

    `schemes`/`requirements` are in A2A 1.0's JSON form; `legacy_schemes`/`legacy_requirements` are
    the 0.3 forms, added when the card also carries 0.3 fields.
    """

    schemes: Mapping[str, Any]
    requirements: Sequence[Mapping[str, Any]]
    legacy_schemes: Mapping[str, Any]
    legacy_requirements: Sequence[Mapping[str, Any]]

    @classmethod
    def bearer(cls, *, required: bool, name: str = "agentgw", description: str | None = None) -> CardSecurity:
        """A bearer-token scheme; required unless the gateway admits anonymous callers."""
        text = description or "A bearer token issued for the agentgw gateway (never the agent's own)"
        return cls(
            schemes={
                name: {
                    "httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "JWT", "description": text}
                }
            },
            requirements=[{"schemes": {name: {"list": []}}}] if required else [],
            legacy_schemes={
                name: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": text}
            },
            legacy_requirements=[{name: []}] if required else [],
        )


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def rewrite_card(
    card: Mapping[str, Any], *, agent_url: str, allowed_skills: Collection[str], security: CardSecurity
) -> dict[str, Any]:
    """The card a caller gets: the agent's, reached through the gateway, listing only allowed skills.

    Every interface URL becomes `agent_url` (gRPC interfaces are dropped: the gateway does not proxy
    them); security schemes and requirements become the gateway's; skills not in `allowed_skills` (ids)
    are removed and the rest lose their per-skill requirements; upstream signatures are removed (they
    no longer match). Everything else is the agent's own. A 0.3-style card stays 0.3-style.
    """
    out: dict[str, Any] = {k: _copy(v) for k, v in card.items() if k != "signatures"}
    modern = isinstance(card.get("supportedInterfaces"), list) or "url" not in card
    legacy = isinstance(card.get("url"), str)
    if modern:
        interfaces = []
        declared = card.get("supportedInterfaces")
        for item in declared if isinstance(declared, list) else []:
            if not isinstance(item, Mapping) or item.get("protocolBinding") not in ("JSONRPC", "HTTP+JSON"):
                continue
            if version_of(item.get("protocolVersion")) is None:
                continue
            entry = {"url": agent_url, "protocolBinding": item["protocolBinding"]}
            if item.get("protocolVersion"):
                entry["protocolVersion"] = item["protocolVersion"]
            if isinstance(item.get("tenant"), str) and item["tenant"]:
                entry["tenant"] = item["tenant"]
            if entry not in interfaces:
                interfaces.append(entry)
        out["supportedInterfaces"] = interfaces
        out["securitySchemes"] = _copy(security.schemes)
        out["securityRequirements"] = _copy(security.requirements)
        out.pop("security", None)
    if legacy:
        extra = card.get("additionalInterfaces")
        transports = [
            i.get("transport")
            for i in (extra if isinstance(extra, list) else [])
            if isinstance(i, Mapping) and i.get("transport") in ("JSONRPC", "HTTP+JSON")
        ]
        preferred = card.get("preferredTransport", "JSONRPC")
        if preferred not in ("JSONRPC", "HTTP+JSON"):
            preferred = transports[0] if transports else "JSONRPC"
        out["url"] = agent_url
        out["preferredTransport"] = preferred
        if "additionalInterfaces" in card:
            out["additionalInterfaces"] = [
                {"url": agent_url, "transport": t} for t in dict.fromkeys(transports)
            ]
        schemes = out.get("securitySchemes") if modern else None
        merged: dict[str, Any] = dict(schemes) if isinstance(schemes, dict) else {}
        for name, legacy_scheme in security.legacy_schemes.items():
            # The 0.3 fields sit beside the 1.0 ones, as a2a-sdk serves a card for both generations.
            merged[name] = {**merged.get(name, {}), **_copy(legacy_scheme)}
        out["securitySchemes"] = merged
        out["security"] = _copy(security.legacy_requirements)
    for key in ("securityRequirements", "security"):
        if key in out and not out[key]:
            del out[key]
    allowed = set(allowed_skills)
    skills = card.get("skills")
    out["skills"] = [
        {k: _copy(v) for k, v in s.items() if k not in ("securityRequirements", "security")}
        for s in (skills if isinstance(skills, list) else [])
        if isinstance(s, Mapping) and s.get("id") in allowed
    ]
    return out


# --- task ownership --------------------------------------------------------------------------------


class TaskOwners(Protocol):
    """Who created each task (by principal subject), per agent."""

    async def claim(self, agent: str, task_id: str, subject: str) -> bool:
        """Record `subject` as the owner unless someone else is; True if `subject` owns it now."""
        ...

    async def owner(self, agent: str, task_id: str) -> str | None: ...


class MemoryTaskOwners:
    """In-memory ownership of one gateway process; the oldest entries go first beyond `capacity`.

    A forgotten task (evicted, or created before a restart) is no one's: it reads as not found.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._owners: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._capacity = capacity

    async def claim(self, agent: str, task_id: str, subject: str) -> bool:
        key = (agent, task_id)
        current = self._owners.get(key)
        if current is None:
            self._owners[key] = subject
            if len(self._owners) > self._capacity:
                self._owners.popitem(last=False)
            return True
        self._owners.move_to_end(key)
        return current == subject

    async def owner(self, agent: str, task_id: str) -> str | None:
        return self._owners.get((agent, task_id))


# --- server-sent events ---------------------------------------------------------------------------

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _event_data(event: bytes) -> tuple[str, Any]:
    name = "message"
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b":"):
            continue
        key, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if key == b"event":
            name = value.decode(errors="replace")
        elif key == b"data":
            data.append(value)
    if not data:
        return name, None
    try:
        return name, orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return name, None


class _SseReader:
    """Splits an upstream SSE body into events as they arrive (an unterminated last event is dropped)."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._chunks = response.aiter_raw()
        self._buffer = b""
        self._done = False
        self.dropped = False  # the agent's connection broke (not: the agent said something wrong)

    async def next_event(self) -> bytes | None:
        """The next event block without its blank line, or None at the end of the stream.

        Raises:
            UpstreamError: the connection broke (`dropped` is then set).
            InvalidAgentResponse: one event larger than `MAX_EVENT_BYTES`.
        """
        while True:
            match = _EVENT_END.search(self._buffer)
            if match is not None:
                event, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
                if event.strip():
                    return event
                continue
            if self._done:
                return None
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._done = True
                continue
            except UpstreamError:
                self.dropped = True
                raise
            self._buffer += chunk
            if len(self._buffer) > MAX_EVENT_BYTES:
                raise InvalidAgentResponse("the agent sent a stream event larger than the gateway accepts")


class _ClosingStreamingResponse(StreamingResponse):
    """A stream that notices a caller going away even while the agent is silent, and runs `on_close`
    however it ends (even if the body was never iterated), so the agent's stream is never left open.

    Starlette stops listening for `http.disconnect` under ASGI spec 2.4 and learns of a departure only
    from a failed send: for a task that stays quiet for an hour, that is an hour of an open upstream.
    """

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the caller went away mid-send
                    finally:
                        group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


# --- the ingress ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Answer:
    """A unary answer from the agent; `raw` is None once the gateway changed `message`."""

    status_code: int
    message: Any
    raw: bytes | None
    content_type: str


@dataclass(slots=True)
class _Card:
    card: UpstreamCard


class A2aIngress:
    """Serves `/a2a/<agent>`: classifies each request into a `Call`, runs the pipeline, forwards."""

    def __init__(
        self,
        registry: A2aRegistry,
        pipeline: Pipeline,
        upstream: A2aHttpUpstream,
        owners: TaskOwners,
        *,
        base_url: str,
        security: CardSecurity,
        max_body_bytes: int,
        signer: CardSigner | None = None,
    ) -> None:
        self._registry = registry
        self._signer = signer
        self._pipeline = pipeline
        self._upstream = upstream
        self._owners = owners
        self._base_url = base_url.rstrip("/")
        self._security = security
        self._max_body = max_body_bytes

    @classmethod
    def build(
        cls,
        agents: Sequence[A2aAgentSpec],
        pipeline: Pipeline,
        *,
        base_url: str,
        allow_anonymous: bool,
        max_body_bytes: int,
        signer: CardSigner | None = None,
        secrets: Secrets | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> A2aIngress:
        """The ingress for the configured agents, with its own pooled client (`limits`, under each
        agent's own) and in-memory task owners;
        upstream card signatures are checked against each agent's `card_keys`, served cards signed by
        `signer` when given.

        Raises:
            ConfigError: an agent's credential secret is missing or unreadable.
        """
        upstream = A2aHttpUpstream(HttpClient(limits=limits))
        try:
            verify = UpstreamCardVerifier(upstream.fetch_card)
            registry = A2aRegistry(agents, upstream.fetch_card, verify=verify, secrets=secrets)
        except A2aConfigError as exc:
            raise ConfigError(str(exc)) from exc
        return cls(
            registry,
            pipeline,
            upstream,
            MemoryTaskOwners(),
            base_url=base_url,
            security=CardSecurity.bearer(required=not allow_anonymous),
            max_body_bytes=max_body_bytes,
            signer=signer,
        )

    def routes(self) -> list[BaseRoute]:
        """The data-plane routes, plain Starlette (the card route first: it is more specific)."""
        return [
            Route("/a2a/{agent}/.well-known/agent-card.json", self.card, methods=["GET"]),
            Route("/a2a/{agent}", self.jsonrpc, methods=["POST"]),
            Route("/a2a/{agent}/{path:path}", self.rest, methods=["GET", "POST", "DELETE"]),
        ]

    async def aclose(self) -> None:
        await self._upstream.aclose()

    def upstream_states(self) -> dict[str, UpstreamState]:
        """What the last request to each agent found."""
        return self._upstream.states()

    def agent_url(self, agent: str) -> str:
        return f"{self._base_url}/a2a/{agent}"

    # --- entry points ---
    async def card(self, request: Request) -> Response:
        """GET the agent's card, rewritten for the caller."""
        spec = self._registry.agent(request.path_params["agent"])
        if spec is None:
            return _rest_error_response(AgentNotFound(f"unknown A2A agent {request.path_params['agent']!r}"))
        call = Call(
            protocol="a2a",
            action="list",
            resource=f"a2a:{spec.name}",
            upstream=spec.name,
            method="GetAgentCard",
            reaches_upstream=False,  # served from the gateway's copy of the card
            public=True,  # a client without credentials learns from it how to authenticate
            credentials=request.headers.get("authorization"),
            endpoint=f"/a2a/{spec.name}",
        )

        async def terminal(call: Call) -> Reply:
            card = await self._card_of(spec)
            return Reply(payload=_Card(card), listing=[skill_object(spec.name, s) for s in card.skills])

        try:
            call.run_id = _run_id(request, None)
            reply = await self._pipeline.run(call, terminal)
            assert isinstance(reply.payload, _Card)
            body = self._rewrite(spec, reply.payload.card.document, reply.listing)
        except Exception as exc:
            return _rest_error_response(exc)
        headers = {"cache-control": "private, no-cache", "vary": "Authorization"}
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    async def jsonrpc(self, request: Request) -> Response:
        """POST a JSON-RPC request."""
        spec = self._registry.agent(request.path_params["agent"])
        if spec is None:
            return _jsonrpc_error_response(
                None, AgentNotFound(f"unknown A2A agent {request.path_params['agent']!r}")
            )
        raw = b""
        try:
            raw = await read_body(request, self._max_body, media_types=JSON_TYPES)
            a2a = parse_jsonrpc(raw)
        except GatewayError as exc:
            return _jsonrpc_error_response(_request_id(raw), exc)
        return await self._handle(request, spec, a2a)

    async def rest(self, request: Request) -> Response:
        """Any HTTP+JSON request under `/a2a/<agent>/`."""
        agent = request.path_params["agent"]
        spec = self._registry.agent(agent)
        if spec is None:
            return _rest_error_response(AgentNotFound(f"unknown A2A agent {agent!r}"))
        try:
            body = (
                await read_body(request, self._max_body, media_types=JSON_TYPES, required=False)
                if request.method == "POST"
                else b""
            )
            a2a = parse_rest(request.method, request.path_params["path"], _raw_suffix(request, agent), body)
        except GatewayError as exc:
            return _rest_error_response(exc)
        return await self._handle(request, spec, a2a)

    # --- the pipeline ---
    async def _handle(self, request: Request, spec: A2aAgentSpec, a2a: A2aRequest) -> Response:
        def refuse(exc: BaseException) -> Response:
            if a2a.binding == "jsonrpc":
                return _jsonrpc_error_response(a2a.rpc_id, exc, a2a.op.generation)
            return _rest_error_response(exc, a2a.op.generation)

        try:
            requested_version(request.headers)
            action, resource = self._classify(spec, a2a)
            run_id = _run_id(request, a2a.context_id)
        except GatewayError as exc:
            return refuse(exc)
        call = Call(
            protocol="a2a",
            action=action,
            resource=resource,
            upstream=spec.name,
            method=a2a.op.name,
            credentials=request.headers.get("authorization"),
            endpoint=f"/a2a/{spec.name}",
            run_id=run_id,
            session_id=next(iter(a2a.task_refs()), None),
            arguments=a2a.params if a2a.op.kind == "send" else None,
        )
        opened: list[_Relay] = []

        async def terminal(call: Call) -> Reply:
            reply = await self._forward(call, spec, a2a, request.headers)
            if isinstance(reply.payload, _Relay):
                opened.append(reply.payload)
            return reply

        try:
            reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            # A stage on the way back refused after the agent started answering: close that answer.
            for relay in opened:
                await relay.abort()
            return refuse(exc)
        return self._render(spec, a2a, reply)

    def _classify(self, spec: A2aAgentSpec, a2a: A2aRequest) -> tuple[Action, str]:
        kind = a2a.op.kind
        if kind == "card":
            return "list", f"a2a:{spec.name}"
        if kind == "send":
            skill = a2a.skill(None)
            if skill is None and spec.default_skill is not None:
                skill = spec.default_skill
                # The agent is told the skill that policy allowed, not left to pick its own default.
                a2a.name_skill(skill)
            if skill is None:
                raise InvalidParams(
                    f"name the skill in metadata.{SKILL_KEY}: A2A agent {spec.name!r} has no default skill"
                )
            return "send", skill_object(spec.name, skill)
        return "call", task_object(spec.name, kind)

    async def _card_of(self, spec: A2aAgentSpec) -> UpstreamCard:
        try:
            return await self._registry.card(spec)
        except CardUnavailable as exc:  # the call itself was never sent
            raise UpstreamUnreachable(str(exc)) from exc

    # --- the terminal: forward to the agent ---
    async def _forward(
        self, call: Call, spec: A2aAgentSpec, a2a: A2aRequest, incoming: Mapping[str, str]
    ) -> Reply:
        card = await self._card_of(spec)
        binding = "JSONRPC" if a2a.binding == "jsonrpc" else "HTTP+JSON"
        interface = card.endpoint(binding, a2a.op.generation)
        if interface is None:
            raise UnsupportedOperation(f"A2A agent {spec.name!r} does not serve the {binding} binding")
        assert call.principal is not None
        for task_id in a2a.task_refs():
            if await self._owners.owner(spec.name, task_id) != call.principal.subject:
                raise TaskNotFound(f"task not found: {task_id[:200]!r}")
        headers = forwarded_headers(incoming)
        headers["accept"] = "text/event-stream, application/json" if a2a.op.streaming else "application/json"
        if a2a.body is not None:
            headers["content-type"] = "application/json"
        credential = self._registry.credential(spec.name)
        if call.upstream_authorization:
            headers["authorization"] = call.upstream_authorization
        elif credential is not None:
            headers[credential[0]] = credential[1]
        url = interface.url.rstrip("/") + a2a.suffix if a2a.binding == "rest" else interface.url
        response = await self._upstream.send(
            a2a.http_method,
            url,
            headers,
            a2a.body,
            timeout_s=spec.timeout_s,
            stream=a2a.op.streaming,
            agent=spec.name,
            limits=spec.limits,
        )
        content_type = response.headers.get("content-type", "")
        if a2a.op.streaming and response.status_code == 200 and content_type.startswith("text/event-stream"):
            return await self._start_relay(call, spec, a2a, response)
        return await self._unary(call, spec, a2a, response)

    async def _claim(self, call: Call, spec: A2aAgentSpec, task_ids: Iterable[str]) -> None:
        assert call.principal is not None
        for task_id in task_ids:
            if not await self._owners.claim(spec.name, task_id, call.principal.subject):
                # The agent answered about a task someone else created: never relay it.
                raise InvalidAgentResponse(f"A2A agent {spec.name!r} answered about a task of another caller")
            if call.session_id is None:
                call.session_id = task_id

    async def _unary(
        self, call: Call, spec: A2aAgentSpec, a2a: A2aRequest, response: UpstreamResponse
    ) -> Reply:
        status = response.status_code
        if status >= 500:
            # The agent's own failure page is not relayed: it would read as the gateway failing.
            await response.aclose()
            raise UpstreamFailed(f"A2A agent {spec.name!r} failed (HTTP {status})")
        try:
            body = await response.aread()
        except AnswerTooLarge as exc:
            raise InvalidAgentResponse(
                f"A2A agent {spec.name!r} answered more than {response.max_answer_bytes} bytes, "
                "more than the gateway reads whole"
            ) from exc
        finally:
            await response.aclose()
        content_type = response.headers.get("content-type", "application/json")
        try:
            message = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            message = None
        if a2a.binding == "jsonrpc":
            if not isinstance(message, dict) or ("result" in message) == ("error" in message):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered HTTP {status} with something not a JSON-RPC response"
                )
            if "error" in message:
                return Reply(payload=_Answer(status, message, body, content_type), status="upstream_error")
            result = message["result"]
        else:
            if not isinstance(message, dict):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered HTTP {status} with something not JSON"
                )
            if not 200 <= status < 300:
                return Reply(
                    payload=_Answer(status, message, body, content_type), status=f"upstream_{status}"
                )
            result = message
        answer = _Answer(status, message, body, content_type)
        kind = a2a.op.kind
        if kind in ("send", "subscribe"):
            await self._claim(call, spec, answer_task_ids(result))
        elif kind == "list":
            # Filtered or refused, never passed through: an unexpected shape could hold anyone's tasks.
            if not isinstance(result, dict) or not isinstance(result.get("tasks", []), list):
                raise InvalidAgentResponse(f"A2A agent {spec.name!r} answered ListTasks without a task list")
            assert call.principal is not None
            mine = []
            for task in result.get("tasks", []):
                task_id = task.get("id") if isinstance(task, Mapping) else None
                if (
                    isinstance(task_id, str)
                    and await self._owners.owner(spec.name, task_id) == call.principal.subject
                ):
                    mine.append(task)
            # What the caller may see of this page; totals over other callers' tasks are not theirs to know.
            result["tasks"], result["totalSize"] = mine, len(mine)
            answer.raw = None
        elif kind == "card":
            if not isinstance(result, Mapping):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered GetExtendedAgentCard without a card"
                )
            listing = [skill_object(spec.name, s) for s in card_skill_ids(result)]
            return Reply(payload=answer, listing=listing)
        return Reply(payload=answer)

    async def _start_relay(
        self, call: Call, spec: A2aAgentSpec, a2a: A2aRequest, response: UpstreamResponse
    ) -> Reply:
        relay = _Relay(self, call, spec, a2a, response)
        try:
            try:
                with anyio.fail_after(spec.timeout_s):
                    first = await relay.reader.next_event()
            except TimeoutError as exc:
                raise UpstreamTimeout(
                    f"A2A agent {spec.name!r} sent no event within {spec.timeout_s:g}s"
                ) from exc
            if first is None:
                raise InvalidAgentResponse(f"A2A agent {spec.name!r} ended the stream without an event")
            await relay.learn(first)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await response.aclose()
            raise
        relay.first = first
        reply = Reply(payload=relay, streaming=True)
        relay.reply = reply
        return reply

    # --- rendering ---
    def _rewrite(
        self, spec: A2aAgentSpec, card: Mapping[str, Any], listing: Sequence[str] | None
    ) -> dict[str, Any]:
        """The card for the caller, signed by the gateway when it signs cards.

        Raises:
            InvalidAgentResponse: the card cannot be read as an A2A card, so it cannot be signed.
        """
        allowed = set(listing or ())
        skill_ids = [s for s in card_skill_ids(card) if skill_object(spec.name, s) in allowed]
        out = rewrite_card(
            card, agent_url=self.agent_url(spec.name), allowed_skills=skill_ids, security=self._security
        )
        if self._signer is None:
            return out
        try:
            return self._signer.sign(out)
        except CardSignatureInvalid as exc:
            # Signing is configured: an unsigned card would look like a stripped one. Refuse instead.
            message = f"the card of A2A agent {spec.name!r} cannot be signed: {exc}"
            raise InvalidAgentResponse(message) from exc

    def _render(self, spec: A2aAgentSpec, a2a: A2aRequest, reply: Reply) -> Response:
        payload = reply.payload
        if isinstance(payload, _Relay):
            return _ClosingStreamingResponse(
                payload.events(),
                payload.abort,
                media_type="text/event-stream",
                headers={"cache-control": "no-store", "x-accel-buffering": "no"},
            )
        assert isinstance(payload, _Answer)
        if a2a.op.kind == "card" and reply.listing is not None:
            message = payload.message
            try:
                if a2a.binding == "jsonrpc":
                    message["result"] = self._rewrite(spec, message["result"], reply.listing)
                else:
                    message = self._rewrite(spec, message, reply.listing)
            except InvalidAgentResponse as exc:
                if a2a.binding == "jsonrpc":
                    return _jsonrpc_error_response(a2a.rpc_id, exc, a2a.op.generation)
                return _rest_error_response(exc, a2a.op.generation)
            payload.message, payload.raw = message, None
        body = payload.raw if payload.raw is not None else orjson.dumps(payload.message)
        return Response(body, status_code=payload.status_code, media_type=payload.content_type.split(";")[0])


class _Relay:
    """An agent's SSE answer on its way to the caller: event by event, as each arrives.

    Task ids named by events are claimed for the caller before the event is passed on. A stream that
    breaks, or ends before a final event, ends with an `error` event; the upstream response is closed
    and the pipeline's settle hooks run exactly once, however the stream ends.
    """

    def __init__(
        self,
        ingress: A2aIngress,
        call: Call,
        spec: A2aAgentSpec,
        a2a: A2aRequest,
        response: UpstreamResponse,
    ) -> None:
        self._ingress = ingress
        self._call = call
        self._spec = spec
        self._a2a = a2a
        self._response = response
        self.reader = _SseReader(response)
        self.first = b""
        self.final = False
        self.reply: Reply | None = None
        self._claimed: set[str] = set()
        self._settled = False

    async def learn(self, event: bytes) -> None:
        """Note what an event says: its task ids (claimed for the caller) and whether it is final.

        Raises:
            InvalidAgentResponse: the event names a task of another caller.
        """
        name, data = _event_data(event)
        if name == "error" or (isinstance(data, Mapping) and "error" in data):
            self.final = True
            return
        result = data.get("result") if self._a2a.binding == "jsonrpc" and isinstance(data, Mapping) else data
        new = [t for t in answer_task_ids(result) if t not in self._claimed]
        if new:
            await self._ingress._claim(self._call, self._spec, new)
            self._claimed.update(new)
        if is_final(result):
            self.final = True

    def _error_event(self, exc: GatewayError) -> bytes:
        if self._a2a.binding == "jsonrpc":
            payload = jsonrpc_error(self._a2a.rpc_id, exc, self._a2a.op.generation)
        else:
            payload = rest_error(exc, self._a2a.op.generation)
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"

    async def events(self) -> AsyncIterator[bytes]:
        status = "ok"
        name = self._spec.name
        try:
            yield self.first + b"\n\n"
            while True:
                event = await self.reader.next_event()
                if event is None:
                    break
                await self.learn(event)
                yield event + b"\n\n"
            if not self.final:
                status = "upstream_incomplete"
                yield self._error_event(
                    InvalidAgentResponse(
                        f"A2A agent {name!r} ended the stream before the task reached a final state"
                    )
                )
        except GatewayError as exc:
            # The upstream client's message already names the agent ("A2A agent 'x' broke off the stream").
            status = "upstream_dropped" if self.reader.dropped else exc.reason
            yield self._error_event(exc)
        except BaseException:
            status = "client_gone"
            raise
        finally:
            await self._finish(status)

    async def abort(self) -> None:
        """Close the upstream stream without relaying it (a later stage refused the call)."""
        await self._finish("aborted")

    async def _finish(self, status: str) -> None:
        with anyio.CancelScope(shield=True):
            await self._response.aclose()
            if self._settled or self.reply is None:
                return
            self._settled = True
            try:
                await self.reply.settle(Usage(), status)
            except Exception:
                log.exception("settling a streamed A2A answer failed", extra={"agent": self._spec.name})


def _run_id(request: Request, context_id: str | None) -> str | None:
    """The `Agent-Run-Id` header, else the message's `contextId`.

    Raises:
        InvalidParams: the one it names is not a valid run id.
    """
    run_id = request.headers.get(RUN_ID_HEADER)
    try:
        if run_id:
            return checked_run_id(run_id, "the Agent-Run-Id header")
        return checked_run_id(context_id, "the message's contextId")
    except InvalidRunId as exc:
        raise InvalidParams(exc.message) from exc


def _raw_suffix(request: Request, agent: str) -> str:
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else quote(request.url.path)
    prefix = f"/a2a/{agent}/"
    if prefix in path:
        suffix = "/" + path.split(prefix, 1)[1]
    else:  # the client percent-encoded the prefix: send the path as classified, encoded again
        suffix = "/" + quote(request.path_params["path"], safe="/:@")
    query = request.url.query
    return f"{suffix}?{query}" if query else suffix


def _request_id(raw: bytes) -> Any:
    """The id of a request refused while being classified, when it has a valid one; else null."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    rpc_id = body.get("id") if isinstance(body, dict) else None
    return rpc_id if isinstance(rpc_id, str | int) and not isinstance(rpc_id, bool) else None
