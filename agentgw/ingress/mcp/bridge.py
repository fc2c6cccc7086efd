"""Bridged MCP endpoints: the gateway is the MCP server, its upstreams are SDK client sessions.

Serves `/mcp` (every upstream, merged), virtual servers (`/mcp/<virtual>`), and `/mcp/<server>` for
upstreams that are not streamable HTTP (stdio, legacy SSE). The SDK's server speaks both eras to the
client; each request runs through the pipeline; upstream requests go through `UpstreamSessions`. The
same server also serves the HTTP+SSE transport of every endpoint, any server's included (`legacy_sse`).
A stateless 2026-07-28 request for the bridge's own methods skips the SDK's per-request machinery:
`modern_bridge` checks it as the SDK would and calls `list_items` / `invoke` directly (decision 0010);
the SDK's handlers call the same two with an `Inbound` built from their context.

Namespacing, when an endpoint prefixes (the default for `/mcp` and virtual servers):
    tool or prompt `name` of server `github`   ->  `github__name`  (separator configurable)
    resource URI `file:///x` of server `fs`     ->  `fs+file:///x`  (still a URI: `fs+file` is a scheme)
Server names use only `[a-z0-9-]` and the separator must contain another character, so the split is
never ambiguous. Lists are fetched from every upstream in parallel, each with its own timeout: a slow
or dead upstream drops out of the list (and is logged) instead of failing or stalling it. Lists are
narrowed by policy, then paginated with gateway-minted opaque cursors.

What a handshake-era client session asks for is kept on its connection (`bridge_sessions`): its log
level (an upstream's log messages during its call reach it on that call's stream, at that level) and
its resource subscriptions (one upstream subscription per resource, updates relayed with the URI each
client subscribed to). Its streams are primed and kept for `Last-Event-ID` (`event_store`). All of it
is per node, with the session (docs/decisions/0011).

The `Mcp-Param-*` headers of a 2026-07-28 tools/call are checked here, after authorization, against the
cached schema of the tool the call is routed to; the SDK's own check would list tools through the
whole pipeline before every call (docs/decisions/0208).

One module, though long: the bridge is one SDK server whose handlers share its catalog, routing and
relay; the wire pieces that stand alone (messages, sessions, HTTP+SSE legs, rendering) are their own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mcp_types as types
import orjson
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp.shared.dispatcher import ProgressFnT as ProgressFn
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import find_invalid_x_mcp_header, validate_mcp_param_headers, x_mcp_header_map
from mcp.shared.message import ServerMessageMetadata
from mcp_types import LOG_LEVEL_META_KEY
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from agentgw.call import Call, Principal, Reply
from agentgw.errors import (
    BadRequest,
    GatewayError,
    HeaderMismatch,
    NotFound,
    ToolQuarantined,
    UpstreamError,
)
from agentgw.ingress.mcp.bridge_sessions import (
    LOG_LEVELS,
    ClientSession,
    Subscriptions,
    at_or_above,
    client_session,
)
from agentgw.ingress.mcp.event_store import ResumableSessionManager, SessionEvents
from agentgw.ingress.mcp.forwarding import Forwarder
from agentgw.ingress.mcp.legacy_sse import SESSION_KEY, LegacySse
from agentgw.ingress.mcp.messages import LIST_KEYS, item_object
from agentgw.ingress.mcp.modern_bridge import Dispatch, ModernEntry
from agentgw.ingress.mcp.rendering import jsonrpc_error_response, run_id_of
from agentgw.ingress.mcp.sessions import SessionLimits, SessionStore
from agentgw.pipeline import Pipeline
from agentgw.registry.models import McpServerSpec, VirtualServerSpec
from agentgw.registry.pins import PinGate
from agentgw.upstream.mcp_sessions import LogFn, Relay, UpstreamSessions

__all__ = ["Bridge", "Endpoint", "Inbound"]

log = logging.getLogger(__name__)

SCOPE_KEY = "agentgw.endpoint"
# Bridged sessions are bound per endpoint, apart from the pass-through's bindings (keyed by server),
# and per transport: an id of one is never taken on the other.
_BINDING_PREFIX = "bridge:"
_SSE_BINDING_PREFIX = "bridge-sse:"
CATALOG_TTL_S = 30.0
MAX_UPSTREAM_PAGES = 50
MAX_INPUT_ROUNDS = 8
_SERVER_REQUEST = TypeAdapter[Any](types.ServerRequest)
_EVENTS: dict[str, Callable[[], ServerEvent]] = {
    "tools": ToolsListChanged,
    "prompts": PromptsListChanged,
    "resources": ResourcesListChanged,
}
_LEGACY_NOTICE = {
    "tools": "send_tool_list_changed",
    "prompts": "send_prompt_list_changed",
    "resources": "send_resource_list_changed",
}
_INPUT_RESULTS: dict[str, type[BaseModel]] = {
    "sampling/createMessage": types.CreateMessageResult,
    "elicitation/create": types.ElicitResult,
    "roots/list": types.ListRootsResult,
}
# The item requests the 2026-07-28 fast path serves; `resources/subscribe` is no method of that era.
_FAST_ITEM_METHODS = ("tools/call", "prompts/get", "resources/read", "completion/complete")
# Which selector list of a virtual server governs each list key.
_SELECTOR_KIND = {
    "tools": "tools",
    "prompts": "prompts",
    "resources": "resources",
    "resourceTemplates": "resources",
}


@dataclass(frozen=True)
class Endpoint:
    """What one bridged URL serves: member servers, an optional selection of each, and naming."""

    label: str  # for audit: "*" for /mcp, else the virtual or server name
    servers: tuple[str, ...]
    prefix: bool
    selection: Mapping[str, Mapping[str, frozenset[str]]] | None = None  # kind -> server -> names ("*" = all)
    # Server -> the scopes its calls need, where that differs from server to server (the merged
    # catalog; elsewhere the identity stage asks the endpoint's for every message).
    scopes: Mapping[str, frozenset[str]] | None = None

    @classmethod
    def merged(cls, servers: list[McpServerSpec]) -> Endpoint:
        # Upstreams with a per-caller credential are served by pass-through only (decision 0602).
        served = [s for s in servers if not s.per_caller_credential]
        scopes = {s.name: frozenset(s.scopes) for s in served if s.scopes}
        return cls("*", tuple(s.name for s in served), prefix=True, scopes=scopes or None)

    def visible_to(self, principal: Principal | None) -> tuple[str, ...]:
        """The servers whose items `principal` may discover: those whose calls its scopes allow."""
        if self.scopes is None:
            return self.servers
        granted = principal.scopes if principal is not None else frozenset()
        return tuple(s for s in self.servers if self.scopes.get(s, frozenset()) <= granted)

    @classmethod
    def single(cls, spec: McpServerSpec) -> Endpoint:
        return cls(spec.name, (spec.name,), prefix=False)

    @classmethod
    def virtual(cls, spec: VirtualServerSpec) -> Endpoint:
        selection: dict[str, dict[str, set[str]]] = {}
        for kind, selectors in (
            ("tools", spec.tools),
            ("prompts", spec.prompts),
            ("resources", spec.resources),
        ):
            for selector in selectors:
                server, _, name = selector.partition("/")
                selection.setdefault(kind, {}).setdefault(server, set()).add(name)
        servers = tuple(sorted({s for per_kind in selection.values() for s in per_kind}))
        frozen = {k: {s: frozenset(n) for s, n in v.items()} for k, v in selection.items()}
        return cls(spec.name, servers, prefix=spec.prefix, selection=frozen)

    @property
    def path(self) -> str:
        """The endpoint's URL path, as ingress authenticated it (a token's audience is checked on it)."""
        return "/mcp" if self.label == "*" else f"/mcp/{self.label}"

    def selects(self, kind: str, server: str, name: str) -> bool:
        if self.selection is None:
            return True
        names = self.selection.get(_SELECTOR_KIND[kind], {}).get(server)
        return names is not None and ("*" in names or name in names)


@dataclass
class _Cached:
    items: list[dict[str, Any]]
    at: float
    # Tools only, built on first use: name -> inputSchema of each tool that declares Mcp-Param headers.
    header_schemas: dict[str, Any] | None = None


@dataclass
class _Catalog:
    """Upstream lists, cached per (server, list key); dropped on list_changed and after a TTL."""

    entries: dict[tuple[str, str], _Cached] = field(default_factory=dict)

    def _fresh(self, server: str, kind: str) -> _Cached | None:
        cached = self.entries.get((server, kind))
        if cached is None or time.monotonic() - cached.at > CATALOG_TTL_S:
            return None
        return cached

    def get(self, server: str, kind: str) -> list[dict[str, Any]] | None:
        cached = self._fresh(server, kind)
        return cached.items if cached is not None else None

    def header_schemas(self, server: str) -> dict[str, Any] | None:
        """The input schemas of `server`'s tools that declare `x-mcp-header`s; None when not cached.

        A tool absent from the map declares none (or declares them invalidly, which the SDK's check
        treats as none), so its call has no header to check.
        """
        cached = self._fresh(server, "tools")
        if cached is None:
            return None
        if cached.header_schemas is None:
            cached.header_schemas = {
                tool["name"]: schema
                for tool in cached.items
                if isinstance(tool.get("name"), str)
                and (schema := tool.get("inputSchema")) is not None
                and find_invalid_x_mcp_header(schema) is None
                and x_mcp_header_map(schema)
            }
        return cached.header_schemas

    def put(self, server: str, kind: str, items: list[dict[str, Any]]) -> None:
        self.entries[(server, kind)] = _Cached(items, time.monotonic())

    def invalidate(self, server: str) -> None:
        for key in [k for k in self.entries if k[0] == server]:
            del self.entries[key]


def _item_name(kind: str, item: Mapping[str, Any]) -> str:
    key = "name" if kind in ("tools", "prompts") else ("uri" if kind == "resources" else "uriTemplate")
    value = item.get(key)
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Inbound:
    """One client request to a bridged endpoint, as the bridge's logic reads it, whichever way it came
    (the SDK's server, either era, or the 2026-07-28 fast path of `modern_bridge`)."""

    endpoint: Endpoint
    method: str
    params: Mapping[str, Any]
    headers: Headers
    session_id: str | None  # the legacy session the request belongs to (`_session_of`)
    protocol_version: str
    # Forwards the upstream's progress notifications to the client; None when it asked for none.
    progress: ProgressFn | None = None
    # Handshake era only: asks the client for what an upstream's input_required result asks for.
    relay: Relay | None = None
    # Handshake era only: the client session's own state (log level, subscriptions).
    client: ClientSession | None = None
    # Makes a relay of upstream log messages onto this request's stream, for a client that wants
    # the levels given; None when the request has no stream to carry them (the fast path).
    log: Callable[[Callable[[Any], bool]], LogFn] | None = None

    @property
    def modern(self) -> bool:
        return self.protocol_version in MODERN_PROTOCOL_VERSIONS


class Bridge:
    """The gateway's own MCP server for bridged endpoints (one SDK server, routed per request)."""

    # Whether 2026-07-28 requests take the hand-written path (`modern_bridge`); off, the SDK serves
    # them all (the tests compare the two answers).
    fast_path = True

    # Pinning (agentgw/registry/pins.py): quarantined tools, prompts, templates are hidden and refused.
    pins: PinGate | None = None
    # Nodes sharing session bindings: sessions are bound to this node, others' requests forwarded.
    nodes: Forwarder | None = None

    def __init__(
        self,
        pipeline: Pipeline,
        sessions: UpstreamSessions,
        *,
        separator: str,
        list_timeout_s: float,
        page_size: int = 100,
        max_body_bytes: int,
        bindings: SessionStore,
        session_limits: SessionLimits | None = None,
    ) -> None:
        if all(c.isalnum() or c == "-" for c in separator):
            raise ValueError("the namespace separator needs a character outside [a-z0-9-] to be unambiguous")
        self._pipeline = pipeline
        self._sessions = sessions
        self._sep = separator
        self._list_timeout = list_timeout_s
        self._page_size = page_size
        self.catalog = _Catalog()
        server: Server[Any] = Server(
            "agentgw",
            version="0.1.0",
            instructions="agentgw: tools of many servers",
            # Without this hook the SDK lists tools (a whole pipeline run, audit record included) before
            # every 2026-07-28 tools/call to check its Mcp-Param-* headers. `_check_param_headers` does
            # that check instead, after authorization: the hook is sync and cannot know the caller.
            get_tool_input_schema=_checked_in_invoke,
        )
        for method in LIST_KEYS:
            server.add_request_handler(method, types.PaginatedRequestParams, self._list)
        server.add_request_handler("tools/call", types.CallToolRequestParams, self._invoke)
        server.add_request_handler("prompts/get", types.GetPromptRequestParams, self._invoke)
        server.add_request_handler("resources/read", types.ReadResourceRequestParams, self._invoke)
        server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, self._invoke)
        server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, self._unsubscribe)
        # Served by the bridge itself, per client session (so `logging` is always advertised to
        # handshake-era clients); the SDK refuses it on 2026-07-28, where levels are per request.
        server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, self._set_level)
        server.add_request_handler("completion/complete", types.CompleteRequestParams, self._invoke)
        # Change events: 2026-07-28 clients listen on subscriptions/listen streams fed by this bus;
        # handshake-era sessions get list_changed notifications on their standalone streams.
        self.bus = InMemorySubscriptionBus()
        server.add_request_handler(
            "subscriptions/listen", types.SubscriptionsListenRequestParams, ListenHandler(self.bus)
        )
        self._legacy_connections: weakref.WeakSet[Any] = weakref.WeakSet()
        # Handshake-era clients' subscriptions, sharing one upstream subscription per resource.
        self.subscriptions = Subscriptions(sessions)
        sessions.on_resource_updated(self.subscriptions.on_updated)
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self.server = server
        self._bindings = bindings
        limits = session_limits or SessionLimits()
        # The SDK's own session limits match the bindings', so neither outlives the other for long.
        # Handshake-era streams are primed and kept (bounded) so a client can resume one on this node.
        self.session_manager = ResumableSessionManager(
            server,
            events=SessionEvents(),
            max_request_body_size=max_body_bytes,
            session_idle_timeout=limits.idle_s,
            max_sessions=limits.total,
        )
        self.sse = LegacySse(server, bindings, limits=limits, max_body_bytes=max_body_bytes)
        # 2026-07-28 requests for the bridge's own methods skip the SDK's per-request machinery.
        self._served: dict[str, Callable[[Inbound], Awaitable[dict[str, Any]]]] = {
            **dict.fromkeys(LIST_KEYS, self.list_items),
            **dict.fromkeys(_FAST_ITEM_METHODS, self.invoke),
        }
        self.modern = ModernEntry(server, self.session_manager.handle_request, self._served, max_body_bytes)

    def speaks_only_legacy(self, server: str) -> bool:
        """Whether the upstream session negotiated a handshake-era version (unknown: False)."""
        version = self._sessions.protocol_version(server)
        return version is not None and version not in MODERN_PROTOCOL_VERSIONS

    def on_list_changed(self, server: str, kind: str) -> None:
        """An upstream's list changed: drop its cached lists and tell the clients that listen."""
        self.catalog.invalidate(server)
        task = asyncio.get_running_loop().create_task(self._announce(kind))
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def _announce(self, kind: str) -> None:
        await self.bus.publish(_EVENTS[kind]())
        for connection in list(self._legacy_connections):
            if not connection.has_standalone_channel:
                continue
            try:
                await getattr(connection, _LEGACY_NOTICE[kind])()
            except Exception as exc:  # a client that went away must not stop the others' notices
                log.info("list_changed not delivered to a client: %s", type(exc).__name__)

    def _remember(self, ctx: ServerRequestContext[Any, Any]) -> None:
        # The SDK exposes the connection (whose standalone stream carries notices) only privately.
        connection = getattr(ctx.session, "_connection", None)
        if connection is not None and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._legacy_connections.add(connection)

    async def asgi(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        principal: Principal,
        headers: Mapping[str, str],
    ) -> None:
        """Serve one HTTP request of a bridged endpoint for `principal` (the SDK writes the response).

        A legacy session is bound to the principal that opened it, per endpoint, in the same store as
        the pass-through's: anyone else's request with its id (POST, GET stream, DELETE) is refused as
        for an unknown id, before the SDK sees it.

        Raises:
            BadRequest: a GET without a session (what an HTTP+SSE client sends).
            SessionNotFound: the request names a session that is unknown, expired, of another
                endpoint, or another principal's.
            Unavailable: the session store is unreachable.
        """
        scope[SCOPE_KEY] = endpoint
        key = _BINDING_PREFIX + endpoint.label
        session_id = headers.get("mcp-session-id")
        if session_id is not None:
            # Whatever the era the request claims: a session id is checked wherever it appears.
            owner = await self._bindings.resolve(session_id, key, principal.subject)
            if self.nodes is not None and self.nodes.elsewhere(owner, headers):
                lost = partial(self._bindings.drop, session_id, principal.subject)
                await self.nodes.forward(owner, scope, receive, send, headers, lost=lost)
                return
            if scope["method"] != "DELETE":
                await self.session_manager.handle_request(scope, receive, send)
                return
            status = await _status_of(self.session_manager.handle_request, scope, receive, send)
            if status is not None and (status < 300 or status == 404):
                try:
                    await self._bindings.drop(session_id, principal.subject)
                except GatewayError as exc:  # answered already; the binding expires on its own
                    log.warning("an ended session stays bound until it expires: %s", exc.message)
            return
        version = headers.get("mcp-protocol-version")
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            # 2026-07-28 (or unknown, which the SDK refuses): stateless, no session to bind. The test is
            # the SDK's own, so a request it serves statefully is never taken for a stateless one.
            if self.fast_path:
                await self.modern(scope, receive, send, headers, self._dispatch(scope, endpoint))
            else:
                await self.session_manager.handle_request(scope, receive, send)
            return
        if scope["method"] == "GET":
            # What a client of the 2024-11-05 HTTP+SSE transport sends first: say where that one is.
            sse = "/mcp/_sse" if endpoint.label == "*" else f"{endpoint.path}/sse"
            raise BadRequest(
                "a stream needs a session (Mcp-Session-Id); clients of the 2024-11-05 HTTP+SSE "
                f"transport connect to {sse}"
            )
        holder = self.nodes.me if self.nodes is not None else None
        opened = _Opening(self._bindings, key, principal.subject, scope, receive, send, holder=holder)
        await self.session_manager.handle_request(scope, receive, opened.send)
        if opened.orphan is not None:
            await self._end_sdk_session(scope, opened.orphan)

    def _dispatch(self, scope: Scope, endpoint: Endpoint) -> Dispatch:
        """How the fast path has the bridge answer a request it has checked (`modern_bridge`)."""

        async def dispatch(method: str, params: dict[str, Any], version: str) -> dict[str, Any]:
            inbound = Inbound(
                endpoint=endpoint,
                method=method,
                params=params,
                headers=Headers(scope=scope),
                session_id=None,  # a 2026-07-28 request belongs to no session
                protocol_version=version,
            )
            return await self._served[method](inbound)

        return dispatch

    async def legacy_sse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        principal: Principal,
        headers: Mapping[str, str],
        leg: str,
    ) -> None:
        """Serve one request of the HTTP+SSE transport (2024-11-05) of `endpoint` for `principal`:
        `leg` "sse" (GET: a session's stream) or "messages" (POST: one message of a session).

        Raises:
            BadRequest: a POST without a session id, or whose body is not one JSON-RPC message.
            SessionNotFound: a POST naming a session that is unknown, closed, of another endpoint, or
                another principal's.
            Unavailable: the session store is unreachable.
        """
        scope[SCOPE_KEY] = endpoint
        key = _SSE_BINDING_PREFIX + endpoint.label
        if leg == "sse":
            await self.sse.stream(
                scope, receive, send, endpoint=endpoint.path, key=key, subject=principal.subject
            )
        else:
            await self.sse.post(
                scope,
                receive,
                send,
                endpoint=endpoint.path,
                key=key,
                subject=principal.subject,
                headers=headers,
            )

    async def _end_sdk_session(self, scope: Scope, session_id: str) -> None:
        """End a session the SDK opened but the store refused to bind (nobody could ever use it)."""
        request = {
            **scope,
            "method": "DELETE",
            "headers": [(b"mcp-session-id", session_id.encode("latin-1"))],
        }

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def discard(_message: Message) -> None:
            return None

        await self.session_manager.handle_request(request, receive, discard)

    # --- naming ---
    def _expose(self, kind: str, server: str, item: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
        if not endpoint.prefix:
            return item
        item = dict(item)
        if kind in ("tools", "prompts"):
            item["name"] = f"{server}{self._sep}{item.get('name', '')}"
        elif kind == "resources":
            item["uri"] = f"{server}+{item.get('uri', '')}"
        else:
            item["uriTemplate"] = f"{server}+{item.get('uriTemplate', '')}"
        return item

    @staticmethod
    def _expose_contents(server: str, result: dict[str, Any]) -> dict[str, Any]:
        # The client must get back the URIs it can read again through this endpoint, which are the
        # namespaced ones it listed, never the upstream's own.
        contents = result.get("contents")
        if not isinstance(contents, list):
            return result
        exposed = [
            {**item, "uri": f"{server}+{item['uri']}"}
            if isinstance(item, dict) and isinstance(item.get("uri"), str)
            else item
            for item in contents
        ]
        return {**result, "contents": exposed}

    def _route(self, endpoint: Endpoint, kind: str, exposed: str) -> tuple[str, str] | None:
        """(server, upstream name) for an exposed name, or None when it names nothing routable."""
        if endpoint.prefix:
            server, sep, name = exposed.partition("+" if kind == "resources" else self._sep)
            if not sep or server not in endpoint.servers:
                return None
        else:
            server, name = self._owner(endpoint, kind, exposed)
            if not server:
                return None
        return (server, name) if endpoint.selects(kind, server, name) or kind == "resources" else None

    def _owner(self, endpoint: Endpoint, kind: str, name: str) -> tuple[str, str]:
        if len(endpoint.servers) == 1:
            return endpoint.servers[0], name
        for server in endpoint.servers:
            if endpoint.selects(kind, server, name):
                return server, name
        return "", name

    # --- discovery ---
    async def _fetch(self, server: str, method: str, kind: str) -> list[dict[str, Any]]:
        cached = self.catalog.get(server, kind)
        if cached is not None:
            return cached
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_UPSTREAM_PAGES):
            params = {"cursor": cursor} if cursor else None
            result = await self._sessions.request(server, method, params, timeout_s=self._list_timeout)
            items.extend(i for i in result.get(kind) or [] if isinstance(i, dict))
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        self.catalog.put(server, kind, items)
        return items

    async def _gather(
        self, servers: tuple[str, ...], method: str, kind: str
    ) -> list[tuple[str, dict[str, Any]]]:
        async def one(server: str) -> list[tuple[str, dict[str, Any]]]:
            try:
                async with asyncio.timeout(self._list_timeout):
                    items = await self._fetch(server, method, kind)
                    if self.pins is not None:
                        items = self.pins.visible(server, kind, items)
                    return [(server, item) for item in items]
            except (TimeoutError, GatewayError) as exc:
                log.warning("upstream %s left out of %s: %s", server, method, exc)
                return []

        results = await asyncio.gather(*(one(s) for s in servers))
        return [pair for per_server in results for pair in per_server]

    async def _list(self, ctx: ServerRequestContext[Any, Any], _params: Any) -> dict[str, Any]:
        return await self.list_items(self._inbound(ctx))

    async def list_items(self, inbound: Inbound) -> dict[str, Any]:
        """Answer a list request (`tools/list`, ...): every member's items, narrowed, one page.

        Raises:
            MCPError: the refusal or failure, in the JSON-RPC error the client gets.
        """
        endpoint = inbound.endpoint
        kind = LIST_KEYS[inbound.method]
        offset = _decode_cursor(inbound.params.get("cursor"))
        call = self._call(inbound, "list", f"mcp:{endpoint.label}")

        async def terminal(call: Call) -> Reply:
            # Discovery applies the scope check of invocation: a server whose calls the token's scopes
            # would not allow shows nothing.
            servers = endpoint.visible_to(call.principal)
            pairs = [
                (server, item)
                for server, item in await self._gather(servers, inbound.method, kind)
                if endpoint.selects(kind, server, _item_name(kind, item))
            ]
            return Reply(payload=pairs, listing=[item_object(s, kind, i) for s, i in pairs])

        reply = await self._run(call, terminal)
        allowed = set(reply.listing or ())
        seen: set[str] = set()
        visible = []
        for server, item in reply.payload:
            if item_object(server, kind, item) not in allowed:
                continue
            exposed = self._expose(kind, server, item, endpoint)
            name = _item_name(kind, exposed)
            if name in seen:  # unprefixed names may collide: the first server listed keeps the name
                log.warning("%s %r of %s hidden: the name is taken on %s", kind, name, server, endpoint.label)
                continue
            seen.add(name)
            visible.append(exposed)
        page = visible[offset : offset + self._page_size]
        result: dict[str, Any] = {kind: page}
        if offset + self._page_size < len(visible):
            result["nextCursor"] = _encode_cursor(offset + self._page_size)
        if inbound.modern:
            # Narrowed for this caller: no shared cache may serve it to anyone else.
            result |= {"resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
        return result

    # --- invocation ---
    async def _invoke(self, ctx: ServerRequestContext[Any, Any], _params: Any) -> dict[str, Any]:
        return await self.invoke(self._inbound(ctx))

    async def invoke(self, inbound: Inbound) -> dict[str, Any]:
        """Answer a request for one item (`tools/call`, `prompts/get`, ...): route it, forward it.

        Raises:
            MCPError: the refusal or failure, in the JSON-RPC error the client gets.
        """
        endpoint = inbound.endpoint
        params = dict(inbound.params)
        method = inbound.method
        if method == "completion/complete":
            ref = dict(params.get("ref") or {})
            kind, key = ("prompts", "name") if ref.get("type") == "ref/prompt" else ("resources", "uri")
            target: dict[str, Any] = ref
        else:
            kind = {"tools/call": "tools", "prompts/get": "prompts"}.get(method, "resources")
            key = "uri" if kind == "resources" else "name"
            target = params
        exposed = target.get(key)
        route = self._route(endpoint, kind, exposed) if isinstance(exposed, str) else None
        server, name = route if route else (endpoint.label, exposed if isinstance(exposed, str) else "")
        action = "call" if kind in ("tools", "prompts") else "read"
        call = self._call(inbound, action, item_object(server, kind, {key: name}))
        call.upstream = server
        if method == "tools/call":
            call.arguments = params.get("arguments")

        async def terminal(_call: Call) -> Reply:
            if route is None:
                raise NotFound(f"unknown {kind[:-1]} {exposed!r}")
            if self.pins is not None:
                routed = {**target, key: name}
                refused = self.pins.refusal(server, method, routed if target is params else {"ref": routed})
                if refused is not None:
                    raise ToolQuarantined(refused)
            if method == "tools/call" and inbound.modern:
                await self._check_param_headers(server, name, params.get("arguments"), inbound.headers)
            target[key] = name
            if target is not params:
                params["ref"] = target
            return Reply(payload=await self._forward(inbound, server, method, params))

        try:
            reply = await self._run(call, terminal)
        except MCPError as exc:
            data = exc.error.data
            if kind == "resources" and isinstance(data, dict) and "uri" in data and isinstance(exposed, str):
                # The client asked for the URI it was shown, not the upstream's (they differ under a prefix).
                exc.error.data = {**data, "uri": exposed}
            raise
        payload: dict[str, Any] = reply.payload
        if method == "resources/read" and route is not None and endpoint.prefix:
            payload = self._expose_contents(server, payload)
        if inbound.modern:
            # A handshake-era upstream's result has no resultType; the modern era requires one.
            payload.setdefault("resultType", "complete")
        return payload

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> dict[str, Any]:
        """End one of the calling session's own subscriptions (no other session's is reachable)."""
        await self.subscriptions.unsubscribe(client_session(ctx, self.subscriptions), params.uri)
        return {}

    async def _check_param_headers(self, server: str, tool: str, arguments: Any, headers: Headers) -> None:
        """Refuse a 2026-07-28 tools/call whose `Mcp-Param-*` headers disagree with its arguments.

        The spec's MUST (SEP-2243), checked against the schema of the tool the call is routed to, from
        the catalog; a cold catalog is filled first (the upstream's list, no pipeline round). Run only
        for an authorized call: a tool the caller may not call must not answer with what it declares.

        Raises:
            HeaderMismatch: a declared header is missing, extra, repeated or not its argument's value.
            UpstreamError: the call carries Mcp-Param headers and the upstream's tool list cannot be had.
        """
        arguments = arguments if isinstance(arguments, Mapping) else {}
        schemas = self.catalog.header_schemas(server)
        if schemas is None:
            present = any(name.startswith("mcp-param-") for name in headers)
            if not arguments and not present:
                return  # no value and no header: nothing to disagree
            try:
                async with asyncio.timeout(self._list_timeout):
                    await self._fetch(server, "tools/list", "tools")
            except (TimeoutError, GatewayError) as exc:
                if not present:
                    # Only a header can mislead an intermediary that routes on it; without one, the
                    # call goes on as it would have without the check.
                    log.warning("Mcp-Param check of %s skipped: its tools are not listed (%s)", server, exc)
                    return
                raise UpstreamError(
                    f"upstream {server!r} did not list its tools: the Mcp-Param headers cannot be checked"
                ) from exc
            schemas = self.catalog.header_schemas(server) or {}
        schema = schemas.get(tool)
        if schema is None:
            return  # declares no header, or an unknown tool (the upstream answers that)
        rejection = validate_mcp_param_headers(schema, arguments, headers)
        if rejection is not None:
            raise HeaderMismatch(rejection.message)

    async def _forward(
        self, inbound: Inbound, server: str, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        if method == "resources/subscribe":
            # Kept per client session; the upstream is subscribed once, whoever else watches.
            if inbound.client is None:
                raise MCPError(code=-32603, message="no client session to keep subscriptions for")
            uri = params["uri"]
            exposed = f"{server}+{uri}" if inbound.endpoint.prefix else uri
            await self.subscriptions.subscribe(inbound.client, exposed, server, uri)
            return {}
        progress = inbound.progress
        relay = inbound.relay
        if inbound.modern or relay is None:
            # A 2026-07-28 client answers input requests itself (MRTR): results pass through untouched,
            # and its retry, carrying requestState, routes by name to the same upstream. It asks for log
            # messages per request: the upstream is asked the same (the SDK checked the level; the fast
            # path leaves such requests to the SDK, whose stream carries the messages).
            meta = params.get("_meta")
            asked = meta.get(LOG_LEVEL_META_KEY) if isinstance(meta, dict) else None
            if asked not in LOG_LEVELS or inbound.log is None:
                return await self._sessions.request(server, method, params, progress=progress)
            return await self._sessions.request(
                server,
                method,
                params,
                progress=progress,
                on_log=inbound.log(lambda level: at_or_above(level, asked)),
                log_level=asked,
            )
        session_key = inbound.session_id
        client = inbound.client
        level = client.level if client is not None else None
        on_log = (
            inbound.log(client.wants) if client is not None and level is not None and inbound.log else None
        )
        result = await self._sessions.request(
            server,
            method,
            params,
            progress=progress,
            relay_key=session_key,
            relay=relay,
            on_log=on_log,
            log_level=level,
        )
        # A handshake-era client cannot read input_required: answer the upstream's input requests by
        # asking the client the legacy way, then retry with the answers, as a 2026 client would.
        for _ in range(MAX_INPUT_ROUNDS):
            if result.get("resultType") != "input_required":
                return result
            requests = result.get("inputRequests") or {}
            answers = {
                k: await relay(r.get("method", ""), r.get("params") or {}) for k, r in requests.items()
            }
            retry = {**params, "inputResponses": answers}
            if "requestState" in result:
                retry["requestState"] = result["requestState"]
            result = await self._sessions.request(
                server,
                method,
                retry,
                progress=progress,
                relay_key=session_key,
                relay=relay,
                on_log=on_log,
                log_level=level,
            )
        raise UpstreamError(f"upstream {server!r} asked for input more than {MAX_INPUT_ROUNDS} times")

    @staticmethod
    def _relay(ctx: ServerRequestContext[Any, Any]) -> Relay:
        """Sends a server->client request on the stream of the client's current request."""

        async def relay(method: str, params: dict[str, Any]) -> dict[str, Any]:
            result_type = _INPUT_RESULTS.get(method)
            if result_type is None:
                raise MCPError(code=types.METHOD_NOT_FOUND, message=f"cannot relay {method!r}")
            server_request = _SERVER_REQUEST.validate_python({"method": method, "params": params})
            result = await ctx.session.send_request(
                server_request, result_type, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
            )
            dumped: dict[str, Any] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
            return dumped

        return relay

    @staticmethod
    def _log(ctx: ServerRequestContext[Any, Any], wants: Callable[[Any], bool]) -> LogFn:
        """Sends an upstream's log message on the stream of the client's call that caused it, if the
        client's level lets it through (`wants`: a session's level is read when the message comes, as
        it may change mid-call)."""

        async def relay(params: dict[str, Any]) -> None:
            if not wants(params.get("level")):
                return
            try:
                message = types.LoggingMessageNotificationParams.model_validate(params)
            except ValidationError:
                return  # not a log message the client could read
            await ctx.session.send_notification(
                types.LoggingMessageNotification(params=message), related_request_id=ctx.request_id
            )

        return relay

    async def _set_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> dict[str, Any]:
        """Keep the level the calling session asked for: its calls' upstream log messages are relayed
        at that level and above (none before it asks)."""
        client_session(ctx, self.subscriptions).level = params.level
        return {}

    @staticmethod
    def _progress(ctx: ServerRequestContext[Any, Any], params: Mapping[str, Any]) -> ProgressFn | None:
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if token is None:
            return None

        async def forward(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.send_progress_notification(
                token, progress, total, message, related_request_id=str(ctx.request_id)
            )

        return forward

    # --- pipeline glue ---
    def _inbound(self, ctx: ServerRequestContext[Any, Any]) -> Inbound:
        """The request the SDK's server hands a handler, as the bridge's logic reads it."""
        request = ctx.request
        if not isinstance(request, Request) or SCOPE_KEY not in request.scope:
            raise MCPError(code=-32603, message="the bridged endpoint needs an HTTP request")
        self._remember(ctx)
        params = ctx.params or {}
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        return Inbound(
            endpoint=request.scope[SCOPE_KEY],
            method=ctx.method,
            params=params,
            headers=request.headers,
            session_id=_session_of(request),
            protocol_version=ctx.protocol_version,
            progress=self._progress(ctx, params),
            relay=None if modern else self._relay(ctx),
            client=None if modern else client_session(ctx, self.subscriptions),
            log=lambda wants: self._log(ctx, wants),
        )

    @staticmethod
    def _call(inbound: Inbound, action: Any, resource: str) -> Call:
        endpoint = inbound.endpoint
        try:
            run_id = run_id_of(inbound.headers, inbound.params)
        except GatewayError as exc:
            raise MCPError(code=exc.jsonrpc_code, message=exc.message) from exc
        return Call(
            protocol="mcp",
            action=action,
            resource=resource,
            upstream=endpoint.label,
            method=inbound.method,
            credentials=inbound.headers.get("authorization"),
            endpoint=endpoint.path,  # not request.url: building that URL costs more than the rest
            run_id=run_id,
            session_id=inbound.session_id,
        )

    async def _run(self, call: Call, terminal: Any) -> Reply:
        try:
            return await self._pipeline.run(call, terminal)
        except UpstreamError as exc:
            # The upstream's own error, code and data, as the client would have had it directly.
            code = exc.data.get("code") if isinstance(exc.data, dict) else None
            data = exc.data.get("data") if isinstance(exc.data, dict) else None
            raise MCPError(
                code=code if isinstance(code, int) else exc.jsonrpc_code, message=exc.message, data=data
            ) from exc
        except GatewayError as exc:
            raise MCPError(code=exc.jsonrpc_code, message=exc.message, data=exc.data) from exc


class _Opening:
    """The `send` of a legacy request that may open a session: binds the id the SDK answers with, to
    `holder` (the node that holds the SDK session) when nodes share bindings.

    The binding is made before the response starts, so the client never sees an id that is not bound.
    When the store refuses it (the caps, or unreachable), the client gets that refusal instead of the
    SDK's answer, and `orphan` names the SDK's session for the caller to end.
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
        holder: str | None = None,
    ) -> None:
        self._bindings = bindings
        self._holder = holder
        self._key = key
        self._subject = subject
        self._scope = scope
        self._receive = receive
        self._send = send
        self._refused = False
        self.orphan: str | None = None

    async def send(self, message: Message) -> None:
        if self._refused:
            return  # the rest of the SDK's answer, which the client must not get
        if message["type"] == "http.response.start" and message["status"] < 400:
            # A refused opening request opened nothing (the SDK discards its session): nothing to bind.
            session_id = next(
                (
                    v.decode("latin-1")
                    for k, v in message.get("headers", ())
                    if k.lower() == b"mcp-session-id"
                ),
                None,
            )
            if session_id is not None:
                try:
                    behind = self._holder or session_id
                    await self._bindings.bind(self._key, behind, self._subject, session_id=session_id)
                except GatewayError as exc:
                    self._refused = True
                    self.orphan = session_id
                    await jsonrpc_error_response(None, exc)(self._scope, self._receive, self._send)
                    return
        await self._send(message)


async def _status_of(app: Any, scope: Scope, receive: Receive, send: Send) -> int | None:
    """Run `app` for one request; the HTTP status it answered with (None if it sent no response)."""
    status: int | None = None

    async def watch(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, watch)
    return status


def _session_of(request: Request) -> str | None:
    """The legacy session a message belongs to: the HTTP+SSE session's, else its `Mcp-Session-Id`.

    The SSE session comes first: it is the one checked for that transport; a header the client added
    to an SSE message was checked by nobody and must not pick another session's run or relay.
    """
    session_id: str | None = request.scope.get(SESSION_KEY) or request.headers.get("mcp-session-id")
    return session_id


def _checked_in_invoke(_tool: str) -> None:
    """The SDK's tool-schema hook: None, so its pre-dispatch Mcp-Param check passes (see `__init__`)."""
    return None


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset})).decode()


def _decode_cursor(cursor: Any) -> int:
    if cursor is None:
        return 0
    try:
        offset = orjson.loads(base64.urlsafe_b64decode(str(cursor)))["o"]
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MCPError(code=-32602, message="invalid cursor") from exc
    if not isinstance(offset, int) or offset < 0:
        raise MCPError(code=-32602, message="invalid cursor")
    return offset
