"""Long-lived SDK client sessions to upstream MCP servers of any transport, for the bridged endpoints.

One supervised connection per upstream: stdio servers are spawned (stderr to the log), restarted when
they exit and stopped on shutdown; HTTP (either era, the SDK negotiates) and legacy SSE servers are
reconnected after a failure. Requests travel as typed SDK requests built from the client's own
method and params, so the SDK stamps what the upstream's era needs.

Server->client requests (sampling, elicitation, roots) need to reach the one client whose call caused
them. A shared connection has no such client, so it answers them with an error; a caller that can
answer (a legacy client session) gets its own upstream session per HTTP/SSE upstream, bound to its
session key, whose callbacks go to that caller's `Relay`. Such sessions close after an idle period.

A shared connection can only carry the gateway's own identity (credential modes static and
client_credentials): its HTTP client asks the credentials stage for the header on every request and
retries once after a 401. Upstreams whose credential is per caller (token exchange, ID-JAG) get no
shared connection: the pass-through serves them (docs/decisions/0602).

Once the shared session to a streamable-HTTP upstream has negotiated a 2026-07-28 (stateless) version,
requests no longer travel through it: each is one POST on the pooled aiohttp client (`_ModernPost`),
about a tenth of the SDK client's CPU per request (docs/decisions/0208). The SDK session stays for
what it does well: negotiating the version, noticing a dead upstream, the subscriptions/listen stream.

One module, though long: each upstream's connection supervisor, its two eras (the SDK's session and
the 2026-07-28 POSTs) and its keepalive share the connection's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx2
import mcp_types as types
import orjson
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT as ProgressFn
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    NAME_BEARING_METHODS,
    encode_header_value,
    find_invalid_x_mcp_header,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp.shared.subscriptions import ResourceUpdated
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    LOG_LEVEL_META_KEY,
    PROTOCOL_VERSION_META_KEY,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import TypeAdapter, ValidationError

from agentgw.errors import (
    BadRequest,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnreachable,
)
from agentgw.records.credentials import GatewayCredential
from agentgw.registry.models import McpServerSpec
from agentgw.upstream.http import HttpClient, UpstreamResponse
from agentgw.upstream.sse import read_events

__all__ = ["LogFn", "ProgressFn", "Relay", "SessionCredentials", "UpstreamSessions"]

log = logging.getLogger(__name__)

_REQUEST = TypeAdapter[Any](types.ClientRequest)
_RAW = TypeAdapter(dict[str, Any])
# Reserved per-request keys of the client's era: the upstream session stamps its own.
_RESERVED_META = "io.modelcontextprotocol/"
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
# Between requests, a shared session is probed this often, and declared lost if a probe takes longer.
KEEPALIVE_S = 15.0
KEEPALIVE_TIMEOUT_S = 10.0
PEER_IDLE_S = 300.0
_LIST_CHANGED = {
    "notifications/tools/list_changed": "tools",
    "notifications/prompts/list_changed": "prompts",
    "notifications/resources/list_changed": "resources",
}
_EVENT_KINDS = {
    "ToolsListChanged": "tools",
    "PromptsListChanged": "prompts",
    "ResourcesListChanged": "resources",
}

# Sends one server->client request (method, params) to the calling client; returns the raw result.
Relay = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
# Passes the params of an upstream's `notifications/message` to the client whose call caused it.
LogFn = Callable[[dict[str, Any]], Awaitable[None]]
# The gateway's own credential for an upstream's shared connection (None: no Authorization header).
SessionCredentials = Callable[[McpServerSpec], GatewayCredential | None]
# The SDK's defaults for its own HTTP clients: a response stream may stay open a long time.
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
_SAMPLING = TypeAdapter[Any](types.CreateMessageResult | types.CreateMessageResultWithTools)
MAX_LIST_PAGES = 50
# Who the gateway says it is to upstreams, on the SDK's sessions and on plain POSTs alike.
CLIENT_INFO = types.Implementation(name="agentgw", version="0.1.0")
_CLIENT_INFO = CLIENT_INFO.model_dump(by_alias=True, mode="json", exclude_none=True)
# What every connection declares (see `_Connection`), as the SDK's client states it on the wire.
_CAPABILITIES = types.ClientCapabilities(
    sampling=types.SamplingCapability(),
    elicitation=types.ElicitationCapability(
        form=types.FormElicitationCapability(), url=types.UrlElicitationCapability()
    ),
    roots=types.RootsCapability(list_changed=True),
).model_dump(by_alias=True, mode="json", exclude_none=True)


class _PeerRelay:
    """The relay of the caller currently using a session-bound connection (one principal's session)."""

    def __init__(self) -> None:
        self.current: Relay | None = None
        self.on_log: LogFn | None = None
        self.level: str | None = None  # the level this session last asked the upstream for

    async def ask(self, method: str, params: Any) -> dict[str, Any] | types.ErrorData:
        relay = self.current
        if relay is None:
            return types.ErrorData(code=types.METHOD_NOT_FOUND, message=f"{method} is not available")
        raw = params.model_dump(by_alias=True, mode="json", exclude_none=True) if params is not None else {}
        try:
            return await relay(method, raw)
        except MCPError as exc:
            return exc.error


class _StderrToLog:
    """A file-like sink the SDK's stdio transport writes the child's stderr to."""

    def __init__(self, server: str) -> None:
        self._read, self._write = os.pipe()
        self._server = server
        self._task: asyncio.Task[None] | None = None

    def fileno(self) -> int:
        return self._write

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._read, "rb", 0)
        )
        try:
            while line := await reader.readline():
                log.info("stdio upstream %s: %s", self._server, line.decode(errors="replace").rstrip())
        finally:
            transport.close()

    def close(self) -> None:
        os.close(self._write)


class _GatewayAuth(httpx2.Auth):
    """Sets the gateway's own credential on every request; after a 401, one retry with a fresh one."""

    requires_request_body = True  # the retry sends the body again

    def __init__(self, credential: GatewayCredential) -> None:
        self._credential = credential

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        request.headers["authorization"] = await self._credential.authorization()
        response = yield request
        if response.status_code == 401:
            request.headers["authorization"] = await self._credential.authorization(refresh=True)
            yield request


@contextlib.asynccontextmanager
async def _authorized_http(url: str, credential: GatewayCredential) -> AsyncIterator[Any]:
    async with (
        httpx2.AsyncClient(auth=_GatewayAuth(credential), timeout=HTTP_TIMEOUT) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


class _ModernPost:
    """Requests to a 2026-07-28 streamable-HTTP upstream, each one POST on the shared aiohttp pool.

    The era is stateless: a request needs only the negotiated version, the client envelope in `_meta`,
    and the routing headers (`Mcp-Method`, `Mcp-Name`, and the `Mcp-Param-*` mirrors of arguments that
    the tool's schema declares, learned from its listings as the SDK's client learns them).
    """

    def __init__(self, http: HttpClient, conn: _Connection, version: str) -> None:
        assert conn.spec.url is not None
        self._http = http
        self._conn = conn
        self._url = conn.spec.url
        self._who = f"upstream {conn.spec.name!r}"
        self._envelope = {
            PROTOCOL_VERSION_META_KEY: version,
            CLIENT_INFO_META_KEY: _CLIENT_INFO,
            CLIENT_CAPABILITIES_META_KEY: _CAPABILITIES,
        }
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": version,
        }
        self._ids = itertools.count(1)

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        timeout_s: float,
        progress: ProgressFn | None,
        on_log: LogFn | None = None,
        log_level: str | None = None,
    ) -> dict[str, Any]:
        """Send one request; its raw result (a tools/list's tools with valid `x-mcp-header`s only).

        With `log_level`, the upstream may log at that level and above, and `on_log` gets each message.

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamUnauthorized: the upstream refused the gateway's credential, fresh one included.
            UpstreamError: the upstream answered with an error or garbage, or not at all.
        """
        params = dict(params) if params else {}
        meta = params.get("_meta")
        envelope = self._envelope
        if isinstance(meta, dict) and isinstance(meta.get(CLIENT_CAPABILITIES_META_KEY), dict):
            # A 2026-07-28 client answers input requests itself: the upstream may ask only for what that
            # client declared, not for what the gateway could relay to a handshake-era client.
            envelope = envelope | {CLIENT_CAPABILITIES_META_KEY: meta[CLIENT_CAPABILITIES_META_KEY]}
        params["_meta"] = _strip_era_meta(meta) | envelope if isinstance(meta, dict) else envelope
        if log_level is not None:
            params["_meta"][LOG_LEVEL_META_KEY] = log_level
        headers = self._headers | {"mcp-method": method}
        name_key = NAME_BEARING_METHODS.get(method)
        name = params.get(name_key) if name_key is not None else None
        if isinstance(name, str):
            headers["mcp-name"] = encode_header_value(name)
        if method != "tools/call" or not isinstance(name, str):
            result = await self._exchange(method, params, headers, timeout_s, progress, on_log)
            return self._absorb(result) if method == "tools/list" else result
        arguments = params.get("arguments")
        arguments = arguments if isinstance(arguments, Mapping) else {}
        try:
            return await self._exchange(
                method, params, headers | self._param_headers(name, arguments), timeout_s, progress, on_log
            )
        except UpstreamError as exc:
            if not isinstance(exc.data, dict) or exc.data.get("code") != types.HEADER_MISMATCH:
                raise
            # The tool declares a header this connection does not know (never listed, or changed):
            # learn it and send once more, as the SDK's client does. The upstream refuses a mismatch
            # before the tool runs, so the second send cannot run it twice.
            try:
                await self._list_tools(timeout_s)
            except GatewayError as listing:
                log.warning("%s: tools not listed after a header mismatch (%s)", self._who, listing)
                raise exc from None
        return await self._exchange(
            method, params, headers | self._param_headers(name, arguments), timeout_s, progress, on_log
        )

    def _param_headers(self, tool: str, arguments: Mapping[str, Any]) -> dict[str, str]:
        header_map = self._conn.param_maps.get(tool)
        return mcp_param_headers(header_map, arguments) if header_map and arguments else {}

    async def _list_tools(self, timeout_s: float) -> None:
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params = {"cursor": cursor} if cursor else None
            page = await self.request("tools/list", params, timeout_s=timeout_s, progress=None)
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                return

    async def _exchange(
        self,
        method: str,
        params: dict[str, Any],
        headers: dict[str, str],
        timeout_s: float,
        progress: ProgressFn | None,
        on_log: LogFn | None = None,
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        response = await self._send(headers, body, timeout_s)
        try:
            return await self._answer(response, request_id, progress, on_log)
        finally:
            await response.aclose()

    def _absorb(self, result: dict[str, Any]) -> dict[str, Any]:
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        maps = self._conn.param_maps
        kept = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                continue
            schema = tool.get("inputSchema")
            if (reason := find_invalid_x_mcp_header(schema)) is not None:
                # Clients MUST drop such a tool (SEP-2243): no caller could call it correctly.
                log.warning("%s: tool %r left out: invalid x-mcp-header (%s)", self._who, name, reason)
                maps.pop(name, None)
                continue
            if header_map := x_mcp_header_map(schema):
                maps[name] = header_map
            else:
                maps.pop(name, None)
            kept.append(tool)
        return {**result, "tools": kept}

    async def _send(self, headers: dict[str, str], body: bytes, timeout_s: float) -> UpstreamResponse:
        credential = self._conn.credential
        if credential is not None:
            headers["authorization"] = await credential.authorization()
        response = await self._http.send("POST", self._url, headers, body, timeout_s=timeout_s, who=self._who)
        if credential is not None and response.status_code == 401:
            await response.aclose()
            headers["authorization"] = await credential.authorization(refresh=True)
            response = await self._http.send(
                "POST", self._url, headers, body, timeout_s=timeout_s, who=self._who
            )
            if response.status_code == 401:
                await response.aclose()
                # Never the upstream's 401 itself: the caller would read it as "your token is bad".
                raise UpstreamUnauthorized(f"{self._who} refused the gateway's credential")
        return response

    async def _answer(
        self, response: UpstreamResponse, request_id: int, progress: ProgressFn | None, on_log: LogFn | None
    ) -> dict[str, Any]:
        if response.status_code == 200 and response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            async for message in _sse_messages(response, self._who):
                if message.get("id") == request_id and "method" not in message:
                    return self._outcome(message)
                method = message.get("method")
                if method == "notifications/progress" and progress is not None:
                    await _report(progress, message.get("params"))
                elif method == "notifications/message" and on_log is not None:
                    await _log(on_log, message.get("params"))
            raise UpstreamError(f"{self._who} ended its stream without an answer")
        try:
            answer: Any = orjson.loads(await response.aread())
        except orjson.JSONDecodeError:
            answer = None
        # An error may come with any status (and without our id, when the upstream could not read it).
        if isinstance(answer, dict) and ("error" in answer or answer.get("id") == request_id):
            return self._outcome(answer)
        raise UpstreamError(f"{self._who} answered HTTP {response.status_code} without a JSON-RPC answer")

    def _outcome(self, message: dict[str, Any]) -> dict[str, Any]:
        error = message.get("error")
        if isinstance(error, dict):
            text, code = error.get("message"), error.get("code")
            raise UpstreamError(
                text if isinstance(text, str) else f"{self._who} failed",
                data=_error_data(code, error.get("data")),
            )
        result = message.get("result")
        if not isinstance(result, dict):
            raise UpstreamError(f"{self._who} answered without a result")
        return result


async def _sse_messages(response: UpstreamResponse, who: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON-RPC messages of an SSE body, as they arrive (events without data are skipped).

    Raises:
        UpstreamError: an event's data is not JSON or larger than the upstream's answer cap, or the
            stream broke off.
    """

    def too_large() -> UpstreamError:
        return UpstreamError(f"{who} sent an event larger than the gateway reads")

    async for event in read_events(
        response.aiter_raw(), max_event_bytes=response.max_answer_bytes, too_large=too_large
    ):
        try:
            message = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{who} sent an event that is not JSON") from exc
        if isinstance(message, dict):
            yield message


async def _log(on_log: LogFn, params: Any) -> None:
    if isinstance(params, dict) and isinstance(params.get("level"), str):
        await on_log(params)


async def _report(progress: ProgressFn, params: Any) -> None:
    if not isinstance(params, dict) or not isinstance(value := params.get("progress"), int | float):
        return
    total, message = params.get("total"), params.get("message")
    await progress(
        float(value),
        float(total) if isinstance(total, int | float) else None,
        message if isinstance(message, str) else None,
    )


class _Connection:
    """One upstream's supervised session."""

    def __init__(
        self,
        spec: McpServerSpec,
        on_list_changed: Callable[[str, str], None],
        *,
        session_bound: bool = False,
        credential: GatewayCredential | None = None,
        http: HttpClient | None = None,
    ) -> None:
        self.spec = spec
        self.http = http  # for plain POSTs once a 2026-07-28 streamable-HTTP session is up
        self.credential = credential
        self._on_list_changed = on_list_changed
        # Every connection declares sampling, elicitation and roots, so that a 2026-07-28 upstream
        # returns input_required for the end client to answer; a shared connection's relay stays
        # empty and answers a handshake-era server->client request with an error.
        self.relay = _PeerRelay()
        self.session_bound = session_bound
        self.last_used = time.monotonic()
        self.client: Client | None = None
        self.ready = asyncio.Event()
        self.dead = asyncio.Event()
        self.failures = 0
        # Set while the session speaks 2026-07-28 over streamable HTTP: requests go as plain POSTs.
        self.post: _ModernPost | None = None
        # Tool name -> {argument path: header token}, from the upstream's listings; kept across
        # reconnects, as the tools are the upstream's, not the session's.
        self.param_maps: dict[str, dict[tuple[str, ...], str]] = {}
        # The resources the bridge's clients watch, subscribed again after a reconnect; on 2026-07-28
        # one subscriptions/listen stream carries them all, reopened when the set changes.
        self.resource_uris: set[str] = set()
        self.on_resource_updated: Callable[[str, str], None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def _sampling(self, context: Any, params: Any) -> Any:
        raw = await self.relay.ask("sampling/createMessage", params)
        return raw if isinstance(raw, types.ErrorData) else _SAMPLING.validate_python(raw)

    async def _elicitation(self, context: Any, params: Any) -> Any:
        raw = await self.relay.ask("elicitation/create", params)
        return raw if isinstance(raw, types.ErrorData) else types.ElicitResult.model_validate(raw)

    async def _roots(self, context: Any) -> Any:
        raw = await self.relay.ask("roots/list", None)
        return raw if isinstance(raw, types.ErrorData) else types.ListRootsResult.model_validate(raw)

    def mark_dead(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.client = None
        self.post = None
        self.ready.clear()
        self.dead.set()

    def _transport_target(self) -> Any:
        spec = self.spec
        if spec.transport == "stdio":
            assert spec.command is not None
            env = {"PATH": os.environ.get("PATH", "")} | spec.env
            return StdioServerParameters(command=spec.command, args=spec.args, env=env)
        assert spec.url is not None
        auth = _GatewayAuth(self.credential) if self.credential is not None else None
        if spec.transport == "sse":
            return sse_client(spec.url, timeout=spec.timeout_s, auth=auth)
        if self.credential is not None:
            return _authorized_http(spec.url, self.credential)
        return spec.url

    async def _message(self, message: Any) -> None:
        root = getattr(message, "root", message)
        method = getattr(root, "method", "")
        kind = _LIST_CHANGED.get(method) if isinstance(method, str) else None
        if kind is not None:
            self._on_list_changed(self.spec.name, kind)
        elif method == "notifications/message" and self.session_bound and self.relay.on_log is not None:
            # A session-bound connection serves one client session: its log messages are that
            # client's (a shared connection's belong to no one and are dropped).
            params = getattr(root, "params", None)
            if params is not None:
                await _log(
                    self.relay.on_log, params.model_dump(by_alias=True, mode="json", exclude_none=True)
                )
        elif method == "notifications/resources/updated" and not self.session_bound and not self.modern:
            # (2026-07-28: the same notice comes from the listen stream, `_watch_resources`.)
            uri = getattr(getattr(root, "params", None), "uri", None)
            if isinstance(uri, str) and self.on_resource_updated is not None:
                self.on_resource_updated(self.spec.name, uri)

    @property
    def modern(self) -> bool:
        client = self.client
        return client is not None and client.session.protocol_version in MODERN_PROTOCOL_VERSIONS

    def rewatch(self) -> asyncio.Future[None]:
        """(Re)open the listen stream of the watched resources; done once the upstream acknowledged it."""
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        client = self.client
        if client is None or not self.resource_uris:
            acked.set_result(None)
            return acked
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_resources(client, sorted(self.resource_uris), acked),
            name=f"upstream:{self.spec.name}:watch",
        )
        return acked

    async def _watch_resources(self, client: Client, uris: list[str], acked: asyncio.Future[None]) -> None:
        try:
            async with client.listen(resource_subscriptions=uris) as subscription:
                if not acked.done():
                    acked.set_result(None)
                async for event in subscription:
                    if isinstance(event, ResourceUpdated) and self.on_resource_updated is not None:
                        self.on_resource_updated(self.spec.name, event.uri)
        except Exception as exc:  # reported to the subscriber that waits, else logged
            if not acked.done():
                acked.set_exception(UpstreamError(f"upstream {self.spec.name!r} refused the subscription"))
            log.info("upstream %s: resource subscriptions ended (%s)", self.spec.name, type(exc).__name__)

    async def _resubscribe(self, client: Client) -> None:
        # A new session knows nothing of the old one's subscriptions.
        for uri in sorted(self.resource_uris):
            try:
                await client.session.send_request(
                    types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult
                )
            except Exception as exc:
                log.warning("upstream %s: a resource not subscribed again (%s)", self.spec.name, _reason(exc))

    async def _listen(self, client: Client) -> None:
        # A 2026-07-28 upstream sends change events only on a subscriptions/listen stream.
        try:
            async with client.listen(
                tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True
            ) as subscription:
                async for event in subscription:
                    kind = _EVENT_KINDS.get(type(event).__name__)
                    if kind is not None:
                        self._on_list_changed(self.spec.name, kind)
        except Exception as exc:  # an upstream without listen support still serves calls
            log.info("upstream %s: no change events (%s)", self.spec.name, type(exc).__name__)

    async def run_once(self) -> None:
        """One session, for a session-bound connection: it ends on failure or when idle."""
        try:
            await self._session()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.info("session-bound upstream %s closed (%s)", self.spec.name, type(exc).__name__)
        finally:
            self.mark_dead()

    async def run(self) -> None:
        """Keep a session open until cancelled; reconnect (restart a stdio child) after each failure."""
        while True:
            connected = False
            try:
                connected = await self._session()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the SDK raises exception groups from its task groups
                self.failures += 1
                backoff = RESTART_BACKOFF_S[min(self.failures, len(RESTART_BACKOFF_S) - 1)]
                # An operator must tell an upstream that cannot be reached from one that dropped a
                # session that was up: the first needs fixing, the second usually heals by itself.
                if self.ready.is_set():
                    log.warning(
                        "upstream %s: connection lost (%s); reconnecting", self.spec.name, _reason(exc)
                    )
                else:
                    log.warning(
                        "upstream %s: cannot connect (%s); retrying in %.1f s",
                        self.spec.name,
                        _reason(exc),
                        backoff,
                    )
            else:
                backoff = RESTART_BACKOFF_S[0]
                if connected:
                    log.info("upstream %s: session ended by the upstream; reconnecting", self.spec.name)
            finally:
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = None
                self.client = None
                self.post = None
                self.ready.clear()
            await anyio.sleep(backoff)

    async def _session(self) -> bool:
        """One session until it ends; True if it ended after being connected, without an error."""
        target = self._transport_target()
        stderr = _StderrToLog(self.spec.name) if self.spec.transport == "stdio" else None
        try:
            if stderr is not None:
                stderr.start()
                from mcp.client.stdio import stdio_client

                target = stdio_client(target, errlog=stderr)  # type: ignore[arg-type]  # needs only fileno()
            mode = "legacy" if self.spec.transport in ("sse", "stdio") else "auto"
            async with Client(
                target,
                mode=mode,
                client_info=CLIENT_INFO,
                message_handler=self._message,
                cache=None,
                sampling_callback=self._sampling,
                elicitation_callback=self._elicitation,
                list_roots_callback=self._roots,
            ) as client:
                self.dead.clear()
                self.client = client
                version = client.session.protocol_version
                modern = version in MODERN_PROTOCOL_VERSIONS
                if modern and self.spec.transport == "streamable-http" and self.http is not None:
                    assert version is not None
                    self.post = _ModernPost(self.http, self, version)
                self.failures = 0
                self.ready.set()
                log.info("upstream %s connected (%s)", self.spec.name, version)
                async with anyio.create_task_group() as tg:
                    if modern and not self.session_bound:
                        tg.start_soon(self._listen, client)
                    if self.resource_uris:
                        if modern:
                            self.rewatch()
                        else:
                            tg.start_soon(self._resubscribe, client)
                    await self._until_closed(client, version if modern else None)
                    tg.cancel_scope.cancel()
            return True
        finally:
            if stderr is not None:
                stderr.close()

    async def _until_closed(self, client: Client, modern_version: str | None) -> None:
        # Leave (and so reconnect) when a request saw the connection close; probe now and then so that
        # a stdio child that died or an HTTP session that expired is noticed between requests too.
        while True:
            with anyio.move_on_after(KEEPALIVE_S):
                await self.dead.wait()
                return
            if self.session_bound and time.monotonic() - self.last_used > PEER_IDLE_S:
                return
            try:
                with anyio.fail_after(KEEPALIVE_TIMEOUT_S):
                    # 2026-07-28 has no ping; server/discover is the one request every server of
                    # that era must answer.
                    if modern_version is not None:
                        await client.session.send_discover(modern_version)
                    else:
                        await client.session.send_ping()
            except MCPError:
                pass  # an error reply still comes from a live server


class UpstreamSessions:
    """The bridge's upstream connections, one supervised session per registered server."""

    def __init__(self, credentials: SessionCredentials | None = None) -> None:
        self._credentials = credentials
        self._listeners: list[Callable[[str, str], None]] = []
        self._updated: Callable[[str, str], None] | None = None
        self._connections: dict[str, tuple[_Connection, asyncio.Task[None]]] = {}
        self._peers: dict[tuple[str, str], tuple[_Connection, asyncio.Task[None]]] = {}
        self._http = HttpClient()

    def on_list_changed(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(server, kind)` when an upstream says its tools, prompts or resources changed."""
        self._listeners.append(listener)

    def on_resource_updated(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(server, uri)` when an upstream says a subscribed resource changed."""
        self._updated = listener
        for conn, _ in self._connections.values():
            conn.on_resource_updated = listener

    async def subscribe(self, server: str, uri: str) -> None:
        """Subscribe the shared session of `server` to the resource `uri` (once; see `unsubscribe`).

        Raises:
            UpstreamUnreachable: not connected in time.
            UpstreamTimeout: no acknowledgment in time.
            UpstreamError: the upstream refused the subscription.
        """
        conn = await self._ready(server)
        if uri in conn.resource_uris:
            return
        if not conn.modern:
            await self.request(server, "resources/subscribe", {"uri": uri})
            conn.resource_uris.add(uri)
            return
        conn.resource_uris.add(uri)
        try:
            async with asyncio.timeout(conn.spec.timeout_s):
                await conn.rewatch()
        except (TimeoutError, GatewayError) as exc:
            conn.resource_uris.discard(uri)
            conn.rewatch()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"upstream {server!r} did not acknowledge the subscription") from exc
            raise

    async def unsubscribe(self, server: str, uri: str) -> None:
        """Undo `subscribe` (the bridge calls it when the last client watching `uri` left).

        Raises:
            GatewayError: the upstream could not be told (its updates are dropped all the same).
        """
        entry = self._connections.get(server)
        if entry is None or uri not in entry[0].resource_uris:
            return
        conn = entry[0]
        conn.resource_uris.discard(uri)
        if conn.modern:
            conn.rewatch()
        elif conn.client is not None:
            await self.request(server, "resources/unsubscribe", {"uri": uri})

    async def _ready(self, server: str) -> _Connection:
        entry = self._connections.get(server)
        if entry is None:
            raise UpstreamUnreachable(f"upstream {server!r} is not connected")
        conn = entry[0]
        try:
            async with asyncio.timeout(conn.spec.timeout_s):
                await conn.ready.wait()
        except TimeoutError as exc:
            raise UpstreamUnreachable(f"upstream {server!r} is not connected") from exc
        return conn

    def _list_changed(self, server: str, kind: str) -> None:
        for listener in self._listeners:
            listener(server, kind)

    def sync(self, specs: list[McpServerSpec]) -> None:
        """Start connections for new or changed servers, stop those of removed ones.

        Servers whose credential is per caller get none: no shared connection may carry one caller's
        token for everyone (the pass-through serves them).
        """
        wanted = {s.name: s for s in specs if not s.per_caller_credential}
        # A changed server's new connection subscribes to what the old one did: clients still watch.
        watched: dict[str, set[str]] = {}
        for name, (conn, task) in list(self._connections.items()):
            if wanted.get(name) != conn.spec:
                task.cancel()
                del self._connections[name]
                watched[name] = conn.resource_uris
        for key, (conn, task) in list(self._peers.items()):
            if wanted.get(key[0]) != conn.spec:
                task.cancel()
                del self._peers[key]
        for name, spec in wanted.items():
            if name not in self._connections:
                try:
                    credential = self._credentials(spec) if self._credentials is not None else None
                except ValueError as exc:  # a credential that cannot be set up (a missing secret)
                    log.error("upstream %s not connected: %s", name, exc)
                    continue
                conn = _Connection(spec, self._list_changed, credential=credential, http=self._http)
                conn.on_resource_updated = self._updated
                conn.resource_uris = watched.get(name, set())
                task = asyncio.get_running_loop().create_task(conn.run(), name=f"upstream:{name}")
                self._connections[name] = (conn, task)

    def connected(self) -> dict[str, bool]:
        """Whether the shared session to each server is up now (for readiness)."""
        return {name: conn.ready.is_set() for name, (conn, _) in self._connections.items()}

    def protocol_version(self, server: str) -> str | None:
        """The version the shared session to `server` negotiated; None when not connected."""
        entry = self._connections.get(server)
        client = entry[0].client if entry is not None else None
        return client.session.protocol_version if client is not None else None

    async def aclose(self) -> None:
        tasks = [task for _, task in (*self._connections.values(), *self._peers.values())]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connections.clear()
        self._peers.clear()
        await self._http.aclose()

    def _peer(self, server: str, key: str, relay: Relay, on_log: LogFn | None) -> _Connection | None:
        shared = self._connections.get(server)
        if shared is None or shared[0].spec.transport == "stdio":
            return None  # one stdio child serves everyone: it can never know which caller to ask
        if shared[0].post is not None:
            return None  # a 2026-07-28 upstream asks through input_required results, never mid-call
        entry = self._peers.get((server, key))
        if entry is None or entry[1].done():
            conn = _Connection(
                shared[0].spec, self._list_changed, session_bound=True, credential=shared[0].credential
            )
            task = asyncio.get_running_loop().create_task(conn.run_once(), name=f"upstream:{server}:peer")
            task.add_done_callback(lambda _t: self._peers.pop((server, key), None))
            entry = self._peers[(server, key)] = (conn, task)
        conn = entry[0]
        conn.relay.current = relay
        conn.relay.on_log = on_log
        conn.last_used = time.monotonic()
        return conn

    async def request(
        self,
        server: str,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        timeout_s: float | None = None,
        progress: ProgressFn | None = None,
        relay_key: str | None = None,
        relay: Relay | None = None,
        on_log: LogFn | None = None,
        log_level: str | None = None,
    ) -> dict[str, Any]:
        """Send one request upstream and return its raw result.

        `log_level` asks the upstream for log messages at that level and above, for `on_log`: on a
        2026-07-28 upstream per request, on a session-bound (relay) session for the session.

        Raises:
            BadRequest: the method and params are not a request the client may send.
            UpstreamUnreachable: not connected, or no connection in time: nothing was sent.
            UpstreamTimeout: no answer in time.
            UpstreamError: the upstream answered with an error or garbage (the error's text travels).
        """
        entry = self._connections.get(server)
        if entry is None:
            raise UpstreamUnreachable(f"upstream {server!r} is not connected")
        conn = entry[0]
        if relay_key is not None and relay is not None:
            conn = self._peer(server, relay_key, relay, on_log) or conn
        timeout = timeout_s or conn.spec.timeout_s
        post = conn.post

        def modern(post: _ModernPost) -> Awaitable[dict[str, Any]]:
            return post.request(
                method, params, timeout_s=timeout, progress=progress, on_log=on_log, log_level=log_level
            )

        try:
            if post is not None:
                # The hot path (set only while connected). asyncio's timeout costs half of anyio's,
                # which the SDK's session below needs for its own cancel scopes.
                async with asyncio.timeout(timeout):
                    return await modern(post)
            with anyio.fail_after(timeout):
                await conn.ready.wait()
                if conn.post is not None:
                    return await modern(conn.post)
                try:
                    request = _REQUEST.validate_python({"method": method, "params": _strip_era(params)})
                except ValidationError as exc:
                    raise BadRequest(f"invalid params for {method}") from exc
                client = conn.client
                if client is None:
                    raise UpstreamUnreachable(f"upstream {server!r} is not connected")
                if conn.session_bound and log_level is not None and conn.relay.level != log_level:
                    await _set_level(client, log_level)
                    conn.relay.level = log_level
                # A TypeAdapter of a plain dict keeps the result raw; the SDK has already checked it
                # against the negotiated era's schema before it gets here.
                result: dict[str, Any] = await client.session.send_request(  # type: ignore[type-var]  # raw dict, see above
                    request, _RAW, request_read_timeout_seconds=timeout, progress_callback=progress
                )
                return result
        except TimeoutError as exc:
            if post is None and not conn.ready.is_set():  # still waiting for a connection: nothing sent
                raise UpstreamUnreachable(f"upstream {server!r} did not connect within {timeout:g}s") from exc
            raise UpstreamTimeout(f"upstream {server!r} did not answer within {timeout:g}s") from exc
        except MCPError as exc:
            if exc.error.code == types.CONNECTION_CLOSED:
                # The session is gone (a stdio child exited, say): later calls wait for the supervisor's
                # reconnect instead of failing on the dead session. This call is not retried: it may
                # have run upstream before the connection closed.
                conn.mark_dead()
                raise UpstreamError(f"upstream {server!r} closed the connection") from exc
            raise UpstreamError(exc.error.message, data=_error_data(exc.error.code, exc.error.data)) from exc
        except GatewayError:
            raise
        except Exception as exc:
            raise UpstreamError(f"upstream {server!r} failed: {type(exc).__name__}") from exc


async def _set_level(client: Client, level: str) -> None:
    try:
        request = types.SetLevelRequest(params=types.SetLevelRequestParams(level=level))
        await client.session.send_request(request, types.EmptyResult)
    except MCPError as exc:  # an upstream without logging: it sends no messages, so none are missed
        log.info("upstream log level not set: %s", exc.error.message)


def _error_data(code: Any, data: Any) -> dict[str, Any] | None:
    """An upstream's JSON-RPC error as `UpstreamError.data`: its code, and its data for the bridge to
    relay (a `resources/read` error names the URI it did not find, say)."""
    if not isinstance(code, int):
        return None
    return {"code": code} if data is None else {"code": code, "data": data}


def _strip_era(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    out = dict(params)
    meta = out.get("_meta")
    if isinstance(meta, dict):
        kept = _strip_era_meta(meta)
        if kept:
            out["_meta"] = kept
        else:
            out.pop("_meta")
    return out


def _strip_era_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_META)}


def _reason(exc: BaseException) -> str:
    """The innermost cause of a failure, for a log line: the SDK wraps everything in exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
