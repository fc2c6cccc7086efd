"""A2A requests, read just enough to classify them: which operation, which task, which skill.

Both bindings (JSON-RPC and HTTP+JSON) and both generations (1.0, and 0.3 by its method names and its
`v1/` paths) are read into one `A2aRequest`; its body is forwarded to the agent as bytes, rewritten
only to name the skill policy allowed. The policy objects a request is decided on are named here too:
`a2a:<agent>/<skill>` for messages and `a2a:<agent>/task/<op>` for task reads and control (skill ids
are percent-encoded outside `[A-Za-z0-9_.~-]`, so no skill can be named `task/...`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import orjson

from agentgw.errors import BadRequest, ParseError
from agentgw.ingress.a2a.errors import InvalidParams, MethodNotFound, VersionNotSupported
from agentgw.registry.a2a import Generation, version_of

__all__ = [
    "SKILL_KEY",
    "A2aRequest",
    "Binding",
    "parse_jsonrpc",
    "parse_rest",
    "requested_version",
    "skill_object",
    "spellings",
    "strings",
    "task_object",
]

SKILL_KEY = "skill"

Binding = Literal["jsonrpc", "rest"]


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


def spellings(obj: Mapping[str, Any], name: str) -> list[Any]:
    """Every value of field `name` in `obj`, under its JSON name and its proto field name.

    Agents parse requests with protobuf JSON (or pydantic with aliases), which accepts `taskId` and
    `task_id` alike: a check that read one spelling could be walked around with the other.
    """
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return [obj[key] for key in dict.fromkeys((name, snake)) if key in obj]


def strings(values: Iterable[Any]) -> list[str]:
    """The non-empty strings among `values`."""
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
        found = [*spellings(self.params, "message"), *spellings(self.params, "request")]
        return [m for m in found if isinstance(m, Mapping)]

    @property
    def context_id(self) -> str | None:
        values = strings(v for m in self.messages for v in spellings(m, "contextId"))
        return values[0] if values else None

    def task_refs(self) -> list[str]:
        """Every task the request is about or refers to; each must be the caller's own."""
        if self.op.kind != "send":
            return list(self.task_ids)
        refs: list[Any] = []
        for message in self.messages:
            refs += spellings(message, "taskId")
            for listed in spellings(message, "referenceTaskIds"):
                refs += listed if isinstance(listed, list) else []
        return list(dict.fromkeys(strings(refs)))

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
            if any(v is not None and not isinstance(v, str) for v in spellings(message, name)):
                raise InvalidParams(f"invalid params: message.{name} must be a string")
        for refs in spellings(message, "referenceTaskIds"):
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
        values = spellings(params, op.task_key)
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
            request.task_ids = list(dict.fromkeys([task_id, *strings(spellings(params, "taskId"))]))
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
