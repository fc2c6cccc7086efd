"""`/mcp/{server}` for a streamable-HTTP upstream: the client's messages go upstream as data.

Everything the upstream's transport does (both eras, SSE streams, resumability with `Last-Event-ID`,
server->client requests on a legacy session) passes through unchanged; the gateway reads each
message only to classify it, runs the pipeline, and narrows discovery results to what policy allows.
Upstream session ids are replaced by gateway-minted ones bound to the principal that created them,
so one caller can never ride another caller's session.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from agentgw.call import Call, Reply
from agentgw.errors import (
    BadRequest,
    UpstreamError,
    UpstreamUnauthorized,
)
from agentgw.ingress.body import read_body_asgi
from agentgw.ingress.mcp.messages import LIST_KEYS, Message, classify, item_object, parse
from agentgw.ingress.mcp.rendering import jsonrpc_error_response, run_id_of
from agentgw.ingress.mcp.sessions import SessionStore
from agentgw.pipeline import Pipeline
from agentgw.upstream.mcp import McpHttpUpstream, UpstreamResponse, forwarded_headers
from registry.models import McpServerSpec

__all__ = ["PassThrough", "header_map"]

log = logging.getLogger(__name__)

RESPONSE_HEADERS = ("content-type", "mcp-protocol-version", "cache-control")


def header_map(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; the first value of a repeated header wins (as with
    Starlette's `Headers.get`, which decodes and scans the raw list on every lookup: a pass-through
    POST looks up about fifteen names, and one decoding pass is cheaper, 16 -> 3 us)."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return out


_SSE_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")


def _narrow(result: Any, kind: str, allowed: set[str], server: str, modern: bool) -> Any:
    if not isinstance(result, dict) or not isinstance(result.get(kind), list):
        raise UpstreamError(f"upstream {server!r} answered a list request with a malformed result")
    result[kind] = [
        i for i in result[kind] if isinstance(i, dict) and item_object(server, kind, i) in allowed
    ]
    if modern:
        # The list is narrowed for this caller: no shared cache may hand it to anyone else.
        result["cacheScope"] = "private"
    return result


@dataclass(slots=True)
class _Listing:
    """A JSON answer read whole: checked, and for discovery narrowed before the client sees it."""

    response: UpstreamResponse
    body: bytes
    kind: str | None  # the list key to narrow, or None to send the body as it is
    modern: bool


class PassThrough:
    """Serves `/mcp/{server}` for streamable-HTTP upstreams."""

    def __init__(
        self, pipeline: Pipeline, upstream: McpHttpUpstream, sessions: SessionStore, max_body_bytes: int
    ) -> None:
        self._pipeline = pipeline
        self._upstream = upstream
        self._sessions = sessions
        self._max_body = max_body_bytes

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, spec: McpServerSpec, headers: Mapping[str, str]
    ) -> None:
        """Answer one request to `/mcp/<spec.name>`; `headers` are the request's, names lower-cased."""
        if scope["method"] == "POST":
            response = await self._post(receive, headers, spec)
        else:
            response = await self._other(scope["method"], headers, spec)
        if isinstance(response, _Listing):
            await _send_whole(send, response)
        else:
            await response(scope, receive, send)

    # --- POST: one JSON-RPC message ---
    async def _post(
        self, receive: Receive, headers: Mapping[str, str], spec: McpServerSpec
    ) -> Response | _Listing:
        try:
            raw = await read_body_asgi(headers, receive, self._max_body)
            message = parse(raw, headers)
        except BadRequest as exc:
            return jsonrpc_error_response(None, exc)
        try:
            run_id = run_id_of(headers, message.params)
        except BadRequest as exc:
            return jsonrpc_error_response(message.id, exc)
        action, resource = classify(spec.name, message)
        call = Call(
            protocol="mcp",
            action=action,
            resource=resource,
            upstream=spec.name,
            method=message.method or "response",
            credentials=headers.get("authorization"),
            endpoint=f"/mcp/{spec.name}",
            run_id=run_id,
            session_id=headers.get("mcp-session-id"),
            arguments=message.params.get("arguments") if message.method == "tools/call" else None,
        )

        async def terminal(call: Call) -> Reply:
            return await self._forward_post(call, headers, spec, message)

        try:
            reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            return jsonrpc_error_response(message.id, exc, in_pipeline=True)
        return self._render(reply, spec)

    async def _upstream_headers(
        self, call: Call, incoming: Mapping[str, str], spec: McpServerSpec
    ) -> dict[str, str]:
        headers = forwarded_headers(incoming)
        headers["content-type"] = "application/json"
        headers.setdefault("accept", "application/json, text/event-stream")
        if call.session_id:
            assert call.principal is not None
            headers["mcp-session-id"] = await self._sessions.resolve(
                call.session_id, spec.name, call.principal.subject
            )
        if call.upstream_authorization:
            headers["authorization"] = call.upstream_authorization
        return headers

    async def _forward_post(
        self, call: Call, incoming: Mapping[str, str], spec: McpServerSpec, message: Message
    ) -> Reply:
        assert spec.url is not None and call.principal is not None
        headers = await self._upstream_headers(call, incoming, spec)
        response = await self._upstream.send(
            "POST", spec.url, headers, message.raw, spec.timeout_s, spec.name
        )
        if response.status_code == 401:
            await _refused(response, spec.name)
        upstream_session = response.headers.get("mcp-session-id")
        if upstream_session and message.method == "initialize" and response.status_code == 200:
            response.headers["mcp-session-id"] = await self._sessions.bind(
                spec.name, upstream_session, call.principal.subject
            )
        elif upstream_session:
            response.headers["mcp-session-id"] = call.session_id or ""
        kind = LIST_KEYS.get(message.method or "")
        content_type = response.headers.get("content-type", "")
        is_sse = content_type.startswith("text/event-stream")
        if not message.is_request or response.status_code != 200 or (is_sse and kind is None):
            status = "ok" if response.status_code < 400 else f"upstream_{response.status_code}"
            return Reply(payload=response, status=status)
        if not is_sse and not content_type.startswith("application/json"):
            await response.aclose()
            raise UpstreamError(f"upstream {spec.name!r} answered with unexpected content ({content_type!r})")
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        messages = _messages(body, content_type)
        answer = next((m for m in messages if isinstance(m, dict) and m.get("id") == message.id), None)
        if answer is None or ("result" in answer) == ("error" in answer):
            raise UpstreamError(
                f"upstream {spec.name!r} answered with something that is not a JSON-RPC response"
            )
        if kind is None or "error" in answer:
            return Reply(payload=_Listing(response, body, None, message.is_modern))
        items = answer["result"].get(kind) if isinstance(answer["result"], dict) else None
        if not isinstance(items, list):
            raise UpstreamError(f"upstream {spec.name!r} answered a list request with a malformed result")
        listing = [item_object(spec.name, kind, i) for i in items if isinstance(i, dict)]
        return Reply(payload=_Listing(response, body, kind, message.is_modern), listing=listing)

    def _render(self, reply: Reply, spec: McpServerSpec) -> Response | _Listing:
        payload = reply.payload
        if isinstance(payload, _Listing):
            if payload.kind is not None:
                payload.body = _rewrite(payload, set(reply.listing or ()), spec.name)
            return payload
        assert isinstance(payload, UpstreamResponse)
        return _stream(payload)

    # --- GET (standalone SSE stream of a legacy session) and DELETE (end a session) ---
    async def _other(
        self, method: str, incoming: Mapping[str, str], spec: McpServerSpec
    ) -> Response | _Listing:
        assert spec.url is not None
        call = Call(
            protocol="mcp",
            action="session",
            resource=f"mcp:{spec.name}",
            upstream=spec.name,
            method=f"HTTP {method}",
            credentials=incoming.get("authorization"),
            endpoint=f"/mcp/{spec.name}",
            session_id=incoming.get("mcp-session-id"),
        )
        url = spec.url

        async def terminal(call: Call) -> Reply:
            headers = await self._upstream_headers(call, incoming, spec)
            headers.pop("content-type", None)
            if method == "GET":
                headers["accept"] = "text/event-stream"
            response = await self._upstream.send(method, url, headers, None, spec.timeout_s, spec.name)
            if response.status_code == 401:
                await _refused(response, spec.name)
            if method == "DELETE" and call.session_id and response.status_code < 300:
                await self._sessions.drop(call.session_id)
            if call.session_id and "mcp-session-id" in response.headers:
                response.headers["mcp-session-id"] = call.session_id
            return Reply(payload=response, status="ok" if response.status_code < 400 else "upstream_error")

        try:
            reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            return jsonrpc_error_response(None, exc, in_pipeline=True)
        return self._render(reply, spec)


async def _refused(response: UpstreamResponse, server: str) -> NoReturn:
    # The upstream refused the credential the gateway sent: the credentials stage retries once with a
    # fresh one. The caller never sees the upstream's 401: it would start OAuth against the wrong server.
    await response.aclose()
    raise UpstreamUnauthorized(f"upstream {server!r} refused the gateway's credential")


def _messages(body: bytes, content_type: str) -> list[Any]:
    if content_type.startswith("text/event-stream"):
        out = []
        for event in _SSE_EVENT_SPLIT.split(body):
            data = b"\n".join(
                line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
            )
            if data:
                try:
                    out.append(orjson.loads(data))
                except orjson.JSONDecodeError:
                    continue
        return out
    try:
        return [orjson.loads(body)]
    except orjson.JSONDecodeError:
        return []


def _rewrite(listing: _Listing, allowed: set[str], server: str) -> bytes:
    assert listing.kind is not None
    content_type = listing.response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        message = orjson.loads(listing.body)
        message["result"] = _narrow(message["result"], listing.kind, allowed, server, listing.modern)
        return orjson.dumps(message)
    events = []
    for event in _SSE_EVENT_SPLIT.split(listing.body):
        lines = event.splitlines()
        data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
        try:
            message = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            message = None
        if isinstance(message, dict) and "result" in message:
            message["result"] = _narrow(message["result"], listing.kind, allowed, server, listing.modern)
            lines = [line for line in lines if not line.startswith(b"data:")]
            lines.append(b"data: " + orjson.dumps(message))
        if lines:
            events.append(b"\n".join(lines))
    return b"\n\n".join(events) + b"\n\n"


async def _send_whole(send: Send, listing: _Listing) -> None:
    headers = [
        (k.encode("latin-1"), v.encode("latin-1")) for k, v in _response_headers(listing.response).items()
    ]
    headers.append((b"content-length", str(len(listing.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": listing.body})


def _response_headers(response: UpstreamResponse) -> dict[str, str]:
    headers = {name: response.headers[name] for name in RESPONSE_HEADERS if name in response.headers}
    if response.headers.get("mcp-session-id"):
        headers["mcp-session-id"] = response.headers["mcp-session-id"]
    return headers


def _stream(response: UpstreamResponse) -> Response:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except UpstreamError:
            log.warning("upstream stream broke off", extra={"url": response.url})

    return StreamingResponse(
        body(),
        status_code=response.status_code,
        headers=_response_headers(response),
        background=BackgroundTask(response.aclose),
    )
