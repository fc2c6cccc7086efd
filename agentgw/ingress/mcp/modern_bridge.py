"""The 2026-07-28 data path of bridged endpoints: one POST in, one `application/json` answer out.

A stateless 2026-07-28 request needs none of the SDK server's per-request machinery (a Request, the
transport-security middleware, a Connection, a ServerRunner, a task group and a memory stream for
the deferred SSE answer); this path parses the body once with orjson and applies the SDK's own
checks, functions of `mcp.shared.inbound`, `mcp_types.methods` and `mcp.server.runner`, in the
order of the SDK's entry (`mcp.server._streamable_http_modern`), so that every answer it gives is
the one the SDK would give: the same JSON-RPC error with the same HTTP status
(`ERROR_CODE_HTTP_STATUS`), the same result with the same shaping (the per-version sieve, the
required `resultType`, the `serverInfo` stamp).

It serves only the methods it was given (the bridge's lists and item requests), without a progress
token or a log level (whose notifications need the SDK's SSE answer). Everything else goes to `fallback`, the
SDK's entry, with the body replayed: other methods (`ping`, `server/discover`,
`subscriptions/listen`, methods nobody serves), notifications, non-POST requests, bodies orjson
cannot parse (the SDK's parser decides), and requests the SDK refuses before the body (Content-Type,
Accept). Decision 0010 says why and what it measured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, cast

import orjson
from mcp.server import Server
from mcp.server.runner import modern_error_data
from mcp.server.streamable_http import check_accept_headers
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types import (
    CORE_RESULT_TYPES,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    LOG_LEVEL_META_KEY,
    METHOD_NOT_FOUND,
    SERVER_INFO_META_KEY,
    JSONRPCRequest,
)
from mcp_types import methods as spec_methods
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Dispatch", "ModernEntry"]

# (method, params, protocol version) -> the handler's result.
Dispatch = Callable[[str, dict[str, Any], str], Awaitable[dict[str, Any]]]

_JSON = [(b"content-type", b"application/json")]
MAX_REMEMBERED_ACCEPTS = 64
# The SDK's answer to a body that is JSON but not one request (a batch, a response, a bad envelope).
_INVALID_BODY = {
    "code": INVALID_REQUEST,
    "message": "Body must be a single JSON-RPC request or notification object",
}


class ModernEntry:
    """Serves one 2026-07-28 request of a bridged endpoint, or hands it to `fallback` (the SDK's)."""

    def __init__(
        self, server: Server[Any], fallback: ASGIApp, methods: Collection[str], max_body_bytes: int
    ) -> None:
        self._server = server
        self._fallback = fallback
        self._methods = frozenset(methods)
        self._max_body = max_body_bytes
        self._accept: dict[str, bool] = {}
        # The SDK hands out a deep copy per response lest one alias another; these results are
        # serialized at once and then dropped, so one copy serves them all.
        self._stamp = server.server_info_stamp

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, headers: Mapping[str, str], dispatch: Dispatch
    ) -> None:
        """Answer the request with `dispatch` (or the fallback); `headers` are its first-wins header map."""
        if (
            scope["method"] != "POST"
            or not headers.get("content-type", "").lower().startswith("application/json")
            or not self._accepts(scope, headers.get("accept", ""))
        ):
            await self._fallback(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            await _too_large(send)
            return
        body, trailing = await self._body(receive)
        if body is None:
            await _too_large(send)
            return
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            await self._fallback(scope, _replay(body, trailing, receive), send)
            return
        if not isinstance(decoded, dict) or "id" not in decoded:
            if not isinstance(decoded, dict):
                await _write(send, 400, None, error=_INVALID_BODY)
            else:  # a notification: the SDK acknowledges it or names the versions it serves
                await self._fallback(scope, _replay(body, trailing, receive), send)
            return
        try:
            request = JSONRPCRequest.model_validate(decoded)
        except ValidationError:
            await _write(send, 400, None, error=_INVALID_BODY)
            return
        params = request.params
        if request.method not in self._methods or _needs_stream(params):
            await self._fallback(scope, _replay(body, trailing, receive), send)
            return
        msg_id = request.id
        # Routing headers are all `mcp-` names (ASGI names are lower case): the others need no decoding.
        duplicated = find_duplicated_routing_header(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.startswith(b"mcp-")
        )
        if duplicated is not None:
            error = {"code": HEADER_MISMATCH, "message": f"{duplicated} header appears more than once"}
            await _write(send, 400, msg_id, error=error)
            return
        verdict = classify_inbound_request(decoded, headers=headers)
        if isinstance(verdict, InboundLadderRejection):
            await _write(
                send, _status(verdict.code), msg_id, error=_error(verdict.code, verdict.message, verdict.data)
            )
            return
        # The SDK's Mcp-Param-* check before dispatch is off on the bridge (its tool-schema hook
        # answers None): the bridge checks those headers itself, after authorization.
        try:
            result = await self._serve(request.method, params, verdict.protocol_version, dispatch)
        except Exception as exc:  # the SDK's mapping: MCPError and ValidationError, else internal
            data = modern_error_data(exc)
            await _write(send, _status(data.code), msg_id, error=_error(data.code, data.message, data.data))
            return
        await _write(send, 200, msg_id, result=result)

    def _accepts(self, scope: Scope, accept: str) -> bool:
        """Whether `accept` takes both answers the SDK may give (JSON and SSE), by the SDK's check.

        Clients send one Accept value on every request, so each value is checked once.
        """
        known = self._accept.get(accept)
        if known is None:
            known = all(check_accept_headers(Request(scope)))
            if len(self._accept) < MAX_REMEMBERED_ACCEPTS:
                self._accept[accept] = known
        return known

    async def _serve(
        self, method: str, params: dict[str, Any] | None, version: str, dispatch: Dispatch
    ) -> dict[str, Any]:
        """What the SDK's `serve_one` does for a request its server has a handler for."""
        try:
            spec_methods.validate_client_request(method, version, params)
        except KeyError:
            raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=method) from None
        entry = self._server.get_request_handler(method)
        if entry is None:
            raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=method)
        entry.params_type.model_validate({} if params is None else params, by_name=False)
        result = dict(await dispatch(method, params or {}, version))
        return self._shape(method, version, result)

    def _shape(self, method: str, version: str, result: dict[str, Any]) -> dict[str, Any]:
        """The SDK's shaping of a modern result (`ServerRunner._serialize`; the bridge sets no cache
        hints)."""
        result_type = result.get("resultType")
        if not isinstance(result_type, str) or result_type in CORE_RESULT_TYPES:
            try:
                result = spec_methods.serialize_server_result(method, version, result)
            except ValidationError:
                raise MCPError(code=INTERNAL_ERROR, message="Handler returned an invalid result") from None
        if result.get("resultType") is None:
            result["resultType"] = "complete"
        meta = result.get("_meta")
        if meta is None:
            result["_meta"] = {SERVER_INFO_META_KEY: self._stamp}
        elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            result["_meta"] = {
                **cast("dict[str, Any]", meta),
                SERVER_INFO_META_KEY: self._stamp,
            }
        return result

    async def _body(self, receive: Receive) -> tuple[bytes | None, Message | None]:
        """The request's body (None when over the limit) and a message that came instead of more body."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None, None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _needs_stream(params: Mapping[str, Any] | None) -> bool:
    """Whether the client may be sent notifications before the answer, which only the SDK's stream
    carries: a progress token, of any type (the bridge forwards the upstream's progress for any token;
    the SDK's transport streams only valid ones), or a log level for this request's log messages."""
    meta = params.get("_meta") if params else None
    return isinstance(meta, dict) and ("progressToken" in meta or LOG_LEVEL_META_KEY in meta)


def _status(code: int) -> int:
    return ERROR_CODE_HTTP_STATUS.get(code, 200)


def _error(code: int, message: str, data: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return error


async def _write(send: Send, status: int, msg_id: Any, *, result: Any = None, error: Any = None) -> None:
    answer: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id}
    if error is not None:
        answer["error"] = error
    else:
        answer["result"] = result
    body = orjson.dumps(answer)
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Send) -> None:
    # The SDK's body limit's answer, word for word (a Starlette Response without a media type).
    body = b"Request body too large"
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, trailing: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives `body` (already read) once, then what came after it, then the client's."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if trailing is not None:
        pending.append(trailing)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
