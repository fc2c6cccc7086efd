"""The 2024-11-05 HTTP+SSE transport, served to clients of the bridged endpoints.

    GET  /mcp/_sse                                   the merged catalog: opens a session's stream
    POST /mcp/_messages?session_id=<id>              one message of that session (202; the answer
                                                     comes on the stream)
    GET  /mcp/<name>/sse, POST /mcp/<name>/messages  the same for one server or virtual server

Server names are `[a-z0-9-]`, so `_sse` and `_messages` can never be one (a server may be named `sse`).
The stream's first event (`endpoint`) names the message URL, so clients only ever configure the GET.

The SDK's `SseServerTransport` frames the stream and feeds the bridge's SDK server, so every message
is handled by the same handlers, and so the same pipeline, as on streamable HTTP. This module adds
what that transport does not do: a session is bound, before the client learns its id, to the principal
that opened it, in the store of every legacy session (so the same caps count it); a POST naming an
unknown session or another principal's is 404; a session no message used for `idle_s` is closed.
A session lives in the process that opened it (its stream is that process's connection); when nodes
share bindings, a message that reaches another node is forwarded to it (forwarding.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import anyio
from mcp.server import Server
from mcp.server.sse import SseServerTransport
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from agentgw.errors import BadRequest, GatewayError, SessionNotFound
from agentgw.ingress.body import read_body_asgi
from agentgw.ingress.mcp.forwarding import Forwarder
from agentgw.ingress.mcp.messages import error_body, parse
from agentgw.ingress.mcp.rendering import jsonrpc_error_response
from agentgw.ingress.mcp.sessions import SessionLimits, SessionStore

__all__ = ["LEGS", "MERGED_LEGS", "SESSION_KEY", "LegacySse", "method_not_allowed"]

log = logging.getLogger(__name__)

# Where the handlers find the session of a message that came over this transport (no header says it).
SESSION_KEY = "agentgw.sse_session"
# Each leg of the transport and the one HTTP method it takes.
LEGS = {"sse": "GET", "messages": "POST"}
# The merged catalog's legs, as the last segment of `/mcp/<segment>`.
MERGED_LEGS = {"_sse": "sse", "_messages": "messages"}
# The SDK's endpoint event: `data: <path>?session_id=<uuid hex>`.
_SESSION_IN_EVENT = re.compile(rb"[?&]session_id=([0-9a-f]{32})")
# Time to release a closed session's binding, even while the request is being cancelled.
_RELEASE_TIMEOUT_S = 5.0


def method_not_allowed(leg: str) -> Response:
    """The answer to a request with a method its leg does not take."""
    allowed = LEGS[leg]
    body = error_body(None, BadRequest.jsonrpc_code, f"method not allowed: this URL takes {allowed} only")
    return Response(body, status_code=405, headers={"Allow": allowed}, media_type="application/json")


class LegacySse:
    """The HTTP+SSE sessions of one process, served by `server` (the bridge's SDK server)."""

    # Nodes sharing session bindings: sessions are bound to this node, others' messages forwarded.
    nodes: Forwarder | None = None

    def __init__(
        self, server: Server[Any], bindings: SessionStore, *, limits: SessionLimits, max_body_bytes: int
    ) -> None:
        self._server = server
        self._bindings = bindings
        self._idle_s = limits.idle_s
        self._max_body = max_body_bytes
        # The SDK names the message URL `<root_path><endpoint>`: the merged catalog's needs its own
        # endpoint, every other one is `<its path>/messages`.
        self._merged = SseServerTransport("/mcp/_messages", max_request_body_size=max_body_bytes)
        self._named = SseServerTransport("/messages", max_request_body_size=max_body_bytes)
        # Open sessions of this process: id -> the scope that closes it once idle.
        self._open: dict[str, anyio.CancelScope] = {}

    async def stream(
        self, scope: Scope, receive: Receive, send: Send, *, endpoint: str, key: str, subject: str
    ) -> None:
        """Answer a GET for `endpoint` (`/mcp` or `/mcp/<name>`): open a session bound to `subject` and
        stream it until the client leaves, the session idles out or the server stops. A session the
        store refuses is answered with the refusal (the caps: 429 or 503; an unreachable store: 503)
        and leaves nothing open."""
        merged = endpoint == "/mcp"
        transport = self._merged if merged else self._named
        root = scope.get("root_path", "")
        scope = {**scope, "root_path": root if merged else root + endpoint}
        closer = anyio.CancelScope()

        def bound(session_id: str) -> None:
            closer.deadline = anyio.current_time() + self._idle_s
            self._open[session_id] = closer

        holder = self.nodes.me if self.nodes is not None else None
        opening = _Opening(
            self._bindings, key, subject, scope, receive, send, closer=closer, bound=bound, holder=holder
        )
        try:
            with closer:
                async with transport.connect_sse(scope, receive, opening.send) as (read, write):
                    await self._server.run(read, write, self._server.create_initialization_options())
        finally:
            with anyio.move_on_after(_RELEASE_TIMEOUT_S, shield=True):
                await self._close(opening, subject)

    async def _close(self, opening: _Opening, subject: str) -> None:
        # An idle session's stream was cut mid-response: end it properly, so the client sees it end.
        await opening.finish()
        if opening.session_id is None or opening.refused:
            return
        self._open.pop(opening.session_id, None)
        try:
            await self._bindings.drop(opening.session_id, subject)
        except GatewayError as exc:  # the stream is closed already; the binding expires on its own
            log.warning("a closed SSE session stays bound until it expires: %s", exc.message)

    async def post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        endpoint: str,
        key: str,
        subject: str,
        headers: Mapping[str, str],
    ) -> None:
        """Answer a POST for `endpoint`: hand one message to the session it names, if `subject` opened
        that session at `endpoint`.

        Raises:
            BadRequest: no session id, or the body is not one JSON-RPC message (ParseError: not JSON).
            SessionNotFound: the session is unknown, closed, of another endpoint or another principal's,
                or held by a node that is gone.
            UnsupportedMediaType: the body is not application/json.
            PayloadTooLarge: the body is larger than the limit.
            Unavailable: the session store is unreachable.
        """
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_id")
        if not values:
            raise BadRequest("session_id is required: POST to the URL the stream's endpoint event names")
        session_id = values[0]
        owner = await self._bindings.resolve(session_id, key, subject)
        raw = await read_body_asgi(headers, receive, self._max_body)
        # Refused here with a JSON-RPC error, before the SDK would put a failure into the session.
        parse(raw, headers)
        closer = self._open.get(session_id)
        if closer is None:
            if self.nodes is not None and self.nodes.elsewhere(owner, headers):
                lost = partial(self._bindings.drop, session_id, subject)
                await self.nodes.forward(owner, scope, receive, send, headers, lost=lost, body=raw)
                return
            # Just closed, or its node holds no more: answered as any lost session.
            raise SessionNotFound("session not found: open a new stream")
        closer.deadline = anyio.current_time() + self._idle_s
        scope[SESSION_KEY] = session_id
        transport = self._merged if endpoint == "/mcp" else self._named
        await transport.handle_post_message(scope, _replay(raw, receive), send)


class _Opening:
    """The `send` of a GET that opens a session: binds the session id before the client can see it.

    The response's start is held back until the first event, the SDK's `endpoint` event, which names
    the session; it goes out once the session is bound (to `holder`, the node that holds the session,
    when nodes share bindings). When the store refuses the binding, the client
    gets the refusal instead and the session is closed at once.
    """

    def __init__(
        self,
        bindings: SessionStore,
        key: str,
        subject: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        closer: anyio.CancelScope,
        bound: Callable[[str], None],
        holder: str | None = None,
    ) -> None:
        self._bindings = bindings
        self._holder = holder
        self._key = key
        self._subject = subject
        self._http_scope = scope
        self._receive = receive
        self._send = send
        self._start: Message | None = None
        self._started = False
        self._ended = False
        self._closer = closer
        self._bound = bound
        self.refused = False
        self.session_id: str | None = None

    async def send(self, message: Message) -> None:
        if self.refused or self._ended:
            return  # what the SDK still writes for a session the client must not have
        if message["type"] == "http.response.start" and not self._started:
            self._start = message
            return
        if self._start is not None and message["type"] == "http.response.body":
            start, self._start = self._start, None
            found = _SESSION_IN_EVENT.search(message.get("body", b""))
            try:
                if found is None:
                    raise GatewayError("internal error: the SSE session has no id")
                session_id = found.group(1).decode("ascii")
                behind = self._holder or session_id
                await self._bindings.bind(self._key, behind, self._subject, session_id=session_id)
            except GatewayError as exc:
                self.refused = True
                await jsonrpc_error_response(None, exc)(self._http_scope, self._receive, self._send)
                self._closer.cancel()  # after the answer: it would cancel the sending too
                return
            self.session_id = session_id
            self._bound(session_id)
            self._started = True
            await self._send(start)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._ended = True
        await self._send(message)

    async def finish(self) -> None:
        """End a response that was started and never ended (its session was closed under it)."""
        if self._started and not self._ended:
            self._ended = True
            with contextlib.suppress(OSError):  # the client is gone already
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` (already read) once, then whatever the client sends next."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
