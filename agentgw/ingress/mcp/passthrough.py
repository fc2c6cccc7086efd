"""`/mcp/{server}` for a streamable-HTTP upstream: the client's messages go upstream as data.

Everything the upstream's transport does (both eras, SSE streams, resumability with `Last-Event-ID`,
server->client requests on a legacy session) passes through unchanged; the gateway reads each
message only to classify it, runs the pipeline, and narrows discovery results to what policy allows.
Upstream session ids are replaced by gateway-minted ones bound to the principal that created them,
so one caller can never ride another caller's session.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from agentgw.call import Call, Principal, Reply
from agentgw.errors import (
    BadRequest,
    GatewayError,
    ToolQuarantined,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnauthorized,
)
from agentgw.ingress.body import read_body_asgi
from agentgw.ingress.mcp.messages import (
    LIST_KEYS,
    Message,
    classify,
    error_body,
    item_object,
    listened_objects,
    parse,
)
from agentgw.ingress.mcp.rendering import jsonrpc_error_response, run_id_of
from agentgw.ingress.mcp.sessions import SessionStore
from agentgw.ingress.relay import RelayResponse
from agentgw.pipeline import Pipeline
from agentgw.registry.models import McpServerSpec
from agentgw.registry.pins import PinGate
from agentgw.tracing import meta_context
from agentgw.upstream.http import AnswerTooLarge
from agentgw.upstream.mcp import McpHttpUpstream, UpstreamResponse, forwarded_headers
from agentgw.upstream.sse import EventTooLarge, SseSplitter, encode_event, parse_events

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

    # Pinning (agentgw/registry/pins.py): quarantined tools, prompts, templates are hidden and refused.
    pins: PinGate | None = None

    def __init__(
        self, pipeline: Pipeline, upstream: McpHttpUpstream, sessions: SessionStore, max_body_bytes: int
    ) -> None:
        self._pipeline = pipeline
        self._upstream = upstream
        self._sessions = sessions
        self._max_body = max_body_bytes

    async def serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        spec: McpServerSpec,
        headers: Mapping[str, str],
        principal: Principal,
    ) -> None:
        """Answer one request to `/mcp/<spec.name>`; `headers` are the request's, names lower-cased;
        `principal` is who its credentials, already verified at that endpoint, say is calling."""
        if scope["method"] == "POST":
            response = await self._post(receive, headers, spec, principal)
        else:
            response = await self._other(scope["method"], headers, spec, principal)
        if isinstance(response, _Listing):
            await _send_whole(send, response)
        else:
            await response(scope, receive, send)

    # --- POST: one JSON-RPC message ---
    async def _post(
        self, receive: Receive, headers: Mapping[str, str], spec: McpServerSpec, principal: Principal
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
            objects=listened_objects(spec.name, message)[1:],
            upstream=spec.name,
            method=message.method or "response",
            credentials=headers.get("authorization"),
            endpoint=f"/mcp/{spec.name}",
            run_id=run_id,
            session_id=headers.get("mcp-session-id"),
            arguments=message.params.get("arguments") if message.method == "tools/call" else None,
            principal=principal,
        )

        opened: list[Reply] = []

        async def terminal(call: Call) -> Reply:
            reply = await self._forward_post(call, headers, spec, message)
            opened.append(reply)
            return reply

        try:
            with meta_context(message.params):
                reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            await _close(opened)
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
        if self.pins is not None:
            refused = self.pins.refusal(spec.name, message.method, message.params)
            if refused is not None:
                raise ToolQuarantined(refused)
        headers = await self._upstream_headers(call, incoming, spec)
        response = await self._upstream.send(
            "POST", spec.url, headers, message.raw, spec.timeout_s, spec.name, limits=spec.limits
        )
        if response.status_code == 401:
            await _refused(response, spec.name)
        if response.status_code >= 500:
            await _failed(response, spec.name)
        upstream_session = response.headers.get("mcp-session-id")
        if upstream_session and message.method == "initialize" and response.status_code == 200:
            try:
                response.headers["mcp-session-id"] = await self._sessions.bind(
                    spec.name, upstream_session, call.principal.subject
                )
            except GatewayError:
                # No binding, so no client can ever use the upstream's session: end it there too.
                await response.aclose()
                await self._end_upstream_session(spec, headers, upstream_session)
                raise
        elif upstream_session:
            response.headers["mcp-session-id"] = call.session_id or ""
        kind = LIST_KEYS.get(message.method or "")
        content_type = response.headers.get("content-type", "")
        is_sse = content_type.startswith("text/event-stream")
        if message.is_request and response.status_code == 200 and is_sse and kind is None:
            try:
                await response.as_stream()
            except UpstreamError:
                await response.aclose()
                raise
            reply = Reply(streaming=True)
            reply.payload = _SseAnswer(response, message.id, spec.name, reply, call)
            return reply
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
        items = [i for i in items if isinstance(i, dict)]
        if self.pins is not None:
            items = self.pins.visible(spec.name, kind, items)
        listing = [item_object(spec.name, kind, i) for i in items]
        return Reply(payload=_Listing(response, body, kind, message.is_modern), listing=listing)

    async def _end_upstream_session(self, spec: McpServerSpec, headers: dict[str, str], session: str) -> None:
        assert spec.url is not None
        headers = {k: v for k, v in headers.items() if k != "content-type"} | {"mcp-session-id": session}
        try:
            response = await self._upstream.send("DELETE", spec.url, headers, None, spec.timeout_s, spec.name)
            await response.aclose()
        except GatewayError as exc:
            log.warning("upstream %s: an unbound session was not ended (%s)", spec.name, exc.message)

    def _render(self, reply: Reply, spec: McpServerSpec) -> Response | _Listing:
        payload = reply.payload
        if isinstance(payload, _Listing):
            if payload.kind is not None:
                payload.body = _rewrite(payload, set(reply.listing or ()), spec.name)
            return payload
        if isinstance(payload, _SseAnswer):
            return RelayResponse(payload.body, payload.finish, headers=_response_headers(payload.response))
        assert isinstance(payload, UpstreamResponse)
        return _stream(payload)

    # --- GET (standalone SSE stream of a legacy session) and DELETE (end a session) ---
    async def _other(
        self, method: str, incoming: Mapping[str, str], spec: McpServerSpec, principal: Principal
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
            principal=principal,
        )
        url = spec.url

        async def terminal(call: Call) -> Reply:
            headers = await self._upstream_headers(call, incoming, spec)
            headers.pop("content-type", None)
            if method == "GET":
                headers["accept"] = "text/event-stream"
            response = await self._upstream.send(
                method,
                url,
                headers,
                None,
                spec.timeout_s,
                spec.name,
                limits=spec.limits,
                stream=method == "GET",
            )
            if response.status_code == 401:
                await _refused(response, spec.name)
            if response.status_code >= 500:
                await _failed(response, spec.name)
            if method == "DELETE" and call.session_id and response.status_code < 300:
                assert call.principal is not None
                await self._sessions.drop(call.session_id, call.principal.subject)
            if call.session_id and "mcp-session-id" in response.headers:
                response.headers["mcp-session-id"] = call.session_id
            reply = Reply(payload=response, status="ok" if response.status_code < 400 else "upstream_error")
            opened.append(reply)
            return reply

        opened: list[Reply] = []
        try:
            reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            await _close(opened)
            return jsonrpc_error_response(None, exc, in_pipeline=True)
        return self._render(reply, spec)


async def _close(replies: list[Reply]) -> None:
    # A stage refused on the way back after the upstream answered: close what it answered, or its
    # connection (and its place in the upstream's lane) would wait for the garbage collector.
    for reply in replies:
        if isinstance(reply.payload, _SseAnswer):
            await reply.payload.finish()
        elif isinstance(reply.payload, UpstreamResponse):
            await reply.payload.aclose()


async def _failed(response: UpstreamResponse, server: str) -> NoReturn:
    # A server error is the upstream's, not the gateway's: relayed as it is, it would read as the
    # gateway failing (and its page may show the upstream's internals). The client gets a protocol error.
    await response.aclose()
    raise UpstreamFailed(f"upstream {server!r} failed (HTTP {response.status_code})")


async def _refused(response: UpstreamResponse, server: str) -> NoReturn:
    # The upstream refused the credential the gateway sent: the credentials stage retries once with a
    # fresh one. The caller never sees the upstream's 401: it would start OAuth against the wrong server.
    await response.aclose()
    raise UpstreamUnauthorized(f"upstream {server!r} refused the gateway's credential")


def _messages(body: bytes, content_type: str) -> list[Any]:
    if content_type.startswith("text/event-stream"):
        out = []
        for event in parse_events(body):
            try:
                out.append(orjson.loads(event.data))
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
    splitter = SseSplitter(max(len(listing.body), 1))  # read whole already, so already bounded
    raws = splitter.feed(listing.body)
    last = splitter.end()
    if last is not None:
        raws.append(last + b"\n\n")
    events = []
    for raw in raws:
        event = splitter.parse(raw)
        try:
            message = orjson.loads(event.data) if event is not None else None
        except orjson.JSONDecodeError:
            message = None
        if not (isinstance(message, dict) and "result" in message):
            events.append(raw)  # passed on as the upstream wrote it
            continue
        message["result"] = _narrow(message["result"], listing.kind, allowed, server, listing.modern)
        # The event's other fields (id, event) stay, in their order; its data is the narrowed listing.
        kept = [line + b"\n" for line in raw.splitlines() if line and not _is_data(line)]
        events.append(b"".join(kept) + encode_event(orjson.dumps(message)))
    return b"".join(events)


def _is_data(line: bytes) -> bool:
    return line.startswith(b"data:") or line == b"data"


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

    return RelayResponse(
        body(), response.aclose, status_code=response.status_code, headers=_response_headers(response)
    )


class _SseAnswer:
    """An SSE answer to one request, relayed whole events at a time as they arrive.

    It watches for the response to the request (and for event ids, which make the stream resumable).
    A stream that ends or breaks before the response, and cannot be resumed, is a failed call: the
    client gets a JSON-RPC error for the request as the last event, and the outcome says why. A stream
    closed after an event id is the upstream's to resume (`Last-Event-ID`): no error is made up.
    """

    def __init__(
        self, response: UpstreamResponse, request_id: Any, server: str, reply: Reply, call: Call
    ) -> None:
        self.response = response
        self._request_id = request_id
        self._server = server
        self._reply = reply
        self._call = call
        self._answered = False
        self._resumable = False
        self._outcome: tuple[str, str | None] | None = None
        self._finished = False
        self._splitter = SseSplitter(response.max_answer_bytes)
        self.body = self._events()

    def _watch(self, event: bytes) -> None:
        parsed = self._splitter.parse(event)
        if self._splitter.last_event_id:
            self._resumable = True
        if parsed is None:
            return
        data = parsed.data
        if b'"result"' not in data and b'"error"' not in data:
            return  # notifications and requests of the upstream's own
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if (
            isinstance(message, dict)
            and message.get("id") == self._request_id
            and ("result" in message or "error" in message)
        ):
            self._answered = True

    def _cut(self, exc: UpstreamError) -> bytes | None:
        """The outcome of a stream that ended at `exc`, and the error event to end it with, if any."""
        if self._answered:
            self._outcome = ("ok", None)
            return None
        if self._resumable and not isinstance(exc, (UpstreamTimeout, AnswerTooLarge)):
            # Closed (or broken) after an event id: the client resumes with Last-Event-ID.
            self._outcome = ("stream_closed", exc.message)
            return None
        self._outcome = (exc.reason, exc.message)
        log.warning("%s", exc.message)
        return encode_event(error_body(self._request_id, exc.jsonrpc_code, exc.message))

    async def _events(self) -> AsyncGenerator[bytes, None]:
        response = self.response
        splitter = self._splitter
        try:
            try:
                async for chunk in response.aiter_raw():
                    events = splitter.feed(chunk)
                    if not events:
                        continue
                    if not self._answered:
                        for event in events:
                            self._watch(event)
                    # Relayed as the upstream wrote them, all that this chunk completed in one write.
                    yield events[0] if len(events) == 1 else b"".join(events)
                last = splitter.end()
            except EventTooLarge:
                cap = response.max_answer_bytes
                raise AnswerTooLarge(
                    f"upstream {self._server!r} sent an event of more than {cap} bytes, "
                    "more than the gateway relays"
                ) from None
            if last is not None:
                # A last event without its blank line: the stream ended, so it is complete; ended here
                # so that nothing the gateway adds joins it.
                if not self._answered:
                    self._watch(last)
                yield last + b"\n\n"
        except UpstreamError as exc:
            last_event = self._cut(exc)
        else:
            last_event = self._cut(
                UpstreamError(f"upstream {self._server!r} ended its stream before answering")
            )
        if last_event is not None:
            yield last_event

    async def finish(self) -> None:
        """Close the upstream's answer and settle the reply once; never raises."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):
            try:
                await self.body.aclose()
                await self.response.aclose()
            except Exception:
                log.exception("closing an MCP stream failed")
            status, detail = self._outcome or ("client_closed", None)
            try:
                await self._reply.settle(self._call.estimate, status, detail)
            except Exception:
                log.exception("settling an MCP stream failed")
