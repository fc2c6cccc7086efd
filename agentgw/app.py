"""`create_app(settings)`: the data plane (ingress routes), the admin API, and the lifespan that
builds every stage once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace.export import SpanExporter
from sqlalchemy import Engine
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentgw import __version__
from agentgw.admin.audit import audit_router
from agentgw.admin.budgets import budgets_router
from agentgw.admin.clients import clients_router
from agentgw.admin.policies import policy_router
from agentgw.api_contract import ADMIN_DEPENDENCIES, GUARDED, method_not_allowed, query_without_null
from agentgw.call import Principal
from agentgw.console import CONSOLE_CLIENT_ID, Console, console_router, console_static
from agentgw.demo.upstream import demo_server
from agentgw.errors import Forbidden, GatewayError, Unavailable
from agentgw.filters.audit import Audit, timestamp
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.budget import Budget, BudgetStore
from agentgw.filters.credentials import Credentials, MemoryTokenCache, TokenService
from agentgw.health import Readiness
from agentgw.identity import Identity, build_identity, signing_key_path
from agentgw.ingress.a2a import A2aIngress
from agentgw.ingress.a2a_signatures import card_signer
from agentgw.ingress.llm import LlmIngress
from agentgw.ingress.mcp.bridge import Bridge
from agentgw.ingress.mcp.passthrough import PassThrough
from agentgw.ingress.mcp.routes import McpIngress
from agentgw.ingress.mcp.routes import path_params as mcp_path_params
from agentgw.ingress.mcp.sessions import MemorySessionStore, RedisSessionStore, SessionLimits, SessionStore
from agentgw.metrics import Known, Metrics, State, metrics_router, serve_metrics
from agentgw.oauth.apikeys import api_key_router
from agentgw.oauth.config import BuiltinClient
from agentgw.oauth.metadata import protected_resource_router
from agentgw.oauth.server import oauth_router
from agentgw.pipeline import Pipeline, ordered
from agentgw.registry.api import registry_router
from agentgw.registry.store import RegistryStore
from agentgw.settings import Settings
from agentgw.storage import create_db, ensure_private_dir, make_engine
from agentgw.storage.audit_checkpoints import checkpointer, trust
from agentgw.storage.audit_log import AuditQuery, SqlAuditLog, iter_records
from agentgw.storage.budget_counters import LocalBudgetStore, budget_store
from agentgw.storage.budget_rules import BudgetRuleBook
from agentgw.tracing import TraceContext, Tracing
from agentgw.upstream.http import DEFAULT_LIMITS
from agentgw.upstream.mcp import McpHttpUpstream
from agentgw.upstream.mcp_sessions import UpstreamSessions

__all__ = ["DirectRoutes", "Gateway", "GatewayApp", "create_app"]

log = logging.getLogger(__name__)

REGISTRY_POLL_S = 2.0
# A budget counter key no rule makes: reading it reaches the store and finds nothing.
READY_PROBE_KEY = "agentgw:readyz"


@dataclass
class Gateway:
    """Everything built once at start-up; ingress adapters and admin routes share it."""

    settings: Settings
    registry: RegistryStore
    authenticate: Authenticate
    authorizer: CasbinAuthorizer
    pipeline: Pipeline
    mcp_upstream: McpHttpUpstream
    passthrough: PassThrough
    sessions: UpstreamSessions
    bridge: Bridge
    llm: LlmIngress
    audit_log: SqlAuditLog
    budget_rules: BudgetRuleBook
    budget_store: BudgetStore
    identity: Identity
    a2a: A2aIngress
    credentials: Credentials | None = None
    readiness: Readiness | None = None
    metrics: Metrics | None = None
    tracing: Tracing | None = None


def build_gateway(settings: Settings, span_exporter: SpanExporter | None = None) -> Gateway:
    """Build the stores and the pipeline (`span_exporter`: see `Tracing`).

    Raises:
        PolicyError: the policy is unreadable, malformed, or empty when that is not allowed.
        ConfigError: an LLM route's, A2A agent's or MCP upstream's secret is missing or unreadable.
    """
    ensure_private_dir(settings.data_dir)
    engine = make_engine(settings.database_url, settings.database)
    create_db(engine)
    admission = settings.admission()
    # A stored server today's rules refuse (a secret not declared for it, a stdio command not allowed,
    # a spec no longer valid) is left out and reported, never a reason not to start.
    registry = RegistryStore(
        engine, lambda spec, from_config: admission.refusal(spec, from_config=from_config)
    )
    registry.sync_config(settings.servers, settings.virtual_servers)
    authorizer = CasbinAuthorizer(
        settings.policy.model,
        settings.policy.file,
        settings.policy.rules,
        allow_empty=settings.policy.allow_empty,
        database=engine if settings.policy.database else None,
    )
    identity = build_identity(settings, engine, registry)
    authenticate = identity.authenticate
    # A2A agents with a token credential mode are served by the same stage as MCP upstreams.
    a2a_tokens = {a.name: u for a in settings.a2a_agents if a.enabled and (u := a.token_upstream())}
    credentials = Credentials(
        registry.server,
        agents=a2a_tokens.get,
        builtin=_builtin_token_service(settings, identity),
        secrets=admission.secrets,
    )
    # A missing secret of the config file's upstreams stops start-up: the file is wrong. One of a server
    # added through the admin API fails that server's calls only (and says so in the log and status).
    owned = [s for s in registry.servers() if registry.owner(s.name) == "config"]
    credentials.prepare([*owned, *a2a_tokens.values()])
    for spec in registry.servers():
        if registry.owner(spec.name) != "config" and (problem := admission.problem(spec, from_config=False)):
            log.error("registry: server %s is failing: %s", spec.name, problem)
    audit_engine = (
        make_engine(settings.audit.database_url, settings.database) if settings.audit.database_url else engine
    )
    # The checkpoint key lives beside the signing key, out of the database (decision 0215).
    key_dir = signing_key_path(settings).parent
    audit_log = SqlAuditLog(
        audit_engine,
        settings.audit,
        checkpointer=checkpointer(settings.audit.checkpoints, key_dir),
        trust=trust(settings.audit.checkpoints, key_dir),
        timeout_s=settings.database.statement_timeout_s,
    )
    audit = Audit(audit_log, settings.audit.redact)
    budget_rules = BudgetRuleBook(engine)
    budget_rules.sync_config(settings.budgets.rules)
    budgets = budget_store(
        settings.budgets, engine, settings.redis_url, database=settings.database, redis=settings.redis
    )
    if isinstance(budgets, LocalBudgetStore) and budgets.recover_since is not None:
        _recount(budgets, budget_rules, audit_engine, settings.budgets.run_ttl_s)
    pipeline = ordered(
        audit=audit,
        authenticate=authenticate,
        authorize=Authorize(authorizer),
        budget=Budget(budgets, budget_rules, run_ttl_s=settings.budgets.run_ttl_s),
        credentials=credentials,
        admitted=audit.admitted,
    )
    tracing = Tracing(settings.tracing, span_exporter)
    pipeline = tracing.pipeline(pipeline)
    limits = DEFAULT_LIMITS.over(settings.upstream_limits)
    upstream = McpHttpUpstream(limits=limits)
    # Sessions in Redis let any node continue a session another node started.
    session_limits = SessionLimits(
        per_principal=settings.max_sessions_per_principal,
        total=settings.max_sessions,
        idle_s=settings.session_idle_s,
    )
    mcp_sessions: SessionStore = (
        RedisSessionStore(settings.redis_url, limits=session_limits, settings=settings.redis)
        if settings.redis_url
        else MemorySessionStore(session_limits)
    )
    passthrough = PassThrough(pipeline, upstream, mcp_sessions, settings.max_body_bytes)
    sessions = UpstreamSessions(credentials.session_credential)
    bridge = Bridge(
        pipeline,
        sessions,
        separator=settings.namespace_separator,
        list_timeout_s=settings.list_timeout_s,
        page_size=settings.list_page_size,
        max_body_bytes=settings.max_body_bytes,
        bindings=mcp_sessions,
        session_limits=session_limits,
    )
    sessions.on_list_changed(bridge.on_list_changed)
    llm = LlmIngress.build(
        settings.llm_routes,
        pipeline,
        max_body_bytes=settings.max_body_bytes,
        secrets=admission.secrets,
        limits=limits,
    )
    a2a = A2aIngress.build(
        settings.a2a_agents,
        pipeline,
        base_url=settings.base_url,
        allow_anonymous=settings.allow_anonymous,
        max_body_bytes=settings.max_body_bytes,
        signer=card_signer(settings.a2a_sign_cards, identity.keys, settings.base_url),
        secrets=admission.secrets,
        limits=limits,
    )
    readiness = _readiness(
        policy=engine if settings.policy.database else None,
        budgets=budgets,
        audit_log=audit_log,
        upstreams=lambda: _upstream_states(upstream, sessions, llm, a2a),
    )
    metrics = None
    if settings.metrics.enabled:
        cache = credentials.cache
        metrics = Metrics(
            pipeline.stages,
            known=_known_upstream(settings, registry),
            state=State(
                upstreams=lambda: _upstream_states(upstream, sessions, llm, a2a),
                token_cache=(lambda: cache.lookups) if isinstance(cache, MemoryTokenCache) else None,
                audit_backlog=audit_log.backlog,
                audit_problem=audit_log.problem,
                audit_commits=lambda: audit_log.commits,
            ),
            principal_labels=settings.metrics.principal_labels,
        )
        pipeline.observer = metrics
    return Gateway(
        settings,
        registry,
        authenticate,
        authorizer,
        pipeline,
        upstream,
        passthrough,
        sessions,
        bridge,
        llm,
        audit_log=audit_log,
        budget_rules=budget_rules,
        budget_store=budgets,
        identity=identity,
        a2a=a2a,
        credentials=credentials,
        readiness=readiness,
        metrics=metrics,
        tracing=tracing,
    )


async def _select_one(engine: Engine) -> None:
    def run() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    await anyio.to_thread.run_sync(run, abandon_on_cancel=True)


def _readiness(
    *,
    policy: Engine | None,
    budgets: BudgetStore,
    audit_log: SqlAuditLog,
    upstreams: Callable[[], dict[str, dict[str, Any]]],
) -> Readiness:
    """The stores a call needs, each with a probe that raises when it cannot be used."""

    async def probe_policy() -> None:
        if policy is not None:  # rules in the database; a file policy is in memory once loaded
            await _select_one(policy)

    async def probe_budgets() -> None:
        # Taking nothing asks whether the store admits calls at all (a local ledger that cannot save
        # its counters refuses); one read reaches its database or Redis.
        await budgets.reserve((), time.time())
        await budgets.used([READY_PROBE_KEY])

    async def probe_audit() -> None:
        problem = audit_log.problem()
        if problem is not None:
            raise Unavailable(problem)
        await _select_one(audit_log.engine)

    stores = {"policy": probe_policy, "budget_store": probe_budgets, "audit_log": probe_audit}
    return Readiness(stores, upstreams)


def _known_upstream(settings: Settings, registry: RegistryStore) -> Known:
    """Whether a call's upstream name is one the gateway defines (metrics label no other)."""
    models = {route.name for route in settings.llm_routes}
    agents = {agent.name for agent in settings.a2a_agents}

    def known(protocol: str, name: str) -> bool:
        if protocol == "mcp":  # `*`: the merged endpoint, /mcp
            return (
                name == "*" or registry.server(name) is not None or registry.virtual_server(name) is not None
            )
        if protocol == "llm":  # "": the model listing
            return name == "" or name in models
        return name in agents

    return known


def _upstream_states(
    mcp: McpHttpUpstream, bridge: UpstreamSessions, llm: LlmIngress, a2a: A2aIngress
) -> dict[str, dict[str, Any]]:
    """Each upstream's last known state, from what calls found (nothing is probed here)."""
    out: dict[str, dict[str, Any]] = {}
    for who, state in (*mcp.states().items(), *a2a.upstream_states().items(), *llm.upstream_states().items()):
        entry: dict[str, Any] = {"ok": state.ok, "since": timestamp(state.at)}
        if not state.ok:
            entry["reason"] = state.detail
        out[who] = entry
    for name, up in bridge.connected().items():
        out[f"upstream {name!r} (bridge session)"] = (
            {"ok": up} if up else {"ok": False, "reason": "not connected"}
        )
    return out


def _recount(ledger: LocalBudgetStore, rules: BudgetRuleBook, audit_engine: Engine, run_ttl_s: float) -> None:
    """The last owner of the budget ledger crashed: recount what it spent after its last save from the
    audit log (whose journal `SqlAuditLog` has already replayed), so that no run starts afresh."""
    assert ledger.recover_since is not None
    since = timestamp(ledger.recover_since)
    records = iter_records(audit_engine, AuditQuery(since=since))
    calls = ledger.recount([rule for rule, _ in rules.rules()], records, run_ttl_s)
    log.warning(
        "budget ledger: the last gateway process stopped without saving its counters; "
        "%d calls since %s recounted from the audit log",
        calls,
        since,
    )


def _builtin_token_service(settings: Settings, identity: Identity) -> TokenService | None:
    """The built-in authorization server's token endpoint, reached in-process (no loopback HTTP, which
    a public URL behind a load balancer would send elsewhere)."""
    if identity.server is None:
        return None
    app = FastAPI()
    app.include_router(oauth_router(identity.server))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=settings.base_url)
    return TokenService(f"{settings.base_url}/oauth/token", http)


def _admin_guard(gateway: Gateway, area: str, act: str) -> Callable[[Request], Awaitable[Principal]]:
    async def guard(request: Request) -> Principal:
        principal = await gateway.authenticate.principal(request.headers.get("authorization"))
        if not gateway.authorizer.decide(principal, f"admin:{area}", act).allowed:
            raise Forbidden(f"denied by policy: {act} on admin:{area} is not granted")
        return principal

    return guard


MCP_METHODS = frozenset({"GET", "POST", "DELETE"})
MAX_REMEMBERED_HOSTS = 64


def _host_headers(scope: Scope) -> list[bytes]:
    return [value for name, value in scope["headers"] if name == b"host"]


class RememberedHostCheck:
    """Starlette's `TrustedHostMiddleware`, with every Host value it let through remembered.

    The allowed hosts are fixed at start-up, so a value that passed once passes always: it goes
    straight to `app` (Starlette decodes every header and parses the Host value per request: 2.2 us
    of a pass-through call). Anything else, refusals and their answers included, is Starlette's.
    At most `MAX_REMEMBERED_HOSTS` values are remembered (ports make many spellings of one host).
    A request with more than one Host header is refused (400, RFC 9112 section 3.2) before either:
    Starlette checks only the first, and what is behind the gateway may read another.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self._check = TrustedHostMiddleware(self._passed, allowed_hosts=allowed_hosts)
        self._passed_hosts: set[bytes] = set()

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        hosts = _host_headers(scope) if scope["type"] == "http" else []
        if hosts and len(self._passed_hosts) < MAX_REMEMBERED_HOSTS:
            self._passed_hosts.add(hosts[0])
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._check(scope, receive, send)
            return
        hosts = _host_headers(scope)
        if len(hosts) > 1:
            await PlainTextResponse("Bad Request: more than one Host header", status_code=400)(
                scope, receive, send
            )
            return
        if hosts and hosts[0] in self._passed_hosts:
            await self.app(scope, receive, send)
            return
        await self._check(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, declared or streamed (chunked, no length).

    For the routes behind FastAPI's stack (the admin API, OAuth endpoints, documents), whose handlers
    read bodies whole and unbounded; the data plane bounds its own (`max_body_bytes`). The body is
    read here, at most `limit` bytes of it, and handed on as it came.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await self._refuse(scope, receive, send)
            return
        received: list[Message] = []
        size = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self._limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body too large: the limit is {self._limit} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


class DirectRoutes:
    """Routes served ahead of FastAPI's middleware stack, with what of it they need.

    A request that one of `routes` fully matches is handed to it with the exception handlers that
    FastAPI's `ExceptionMiddleware` would have given it (`GatewayError`, `HTTPException`; the route
    applies them, as under the stack); anything else (no route, a wrong method) goes to `fallback`,
    the whole stack, which answers as before. An exception no handler takes reaches the server, which
    answers 500 as the stack's `ServerErrorMiddleware` did.
    """

    def __init__(self, app: GatewayApp, routes: list[BaseRoute], fallback: ASGIApp) -> None:
        self._app = app
        self._routes = routes
        self._fallback = fallback
        self._handlers: tuple[dict[Any, Any], dict[int, Any]] | None = None

    def _exception_handlers(self) -> tuple[dict[Any, Any], dict[int, Any]]:
        # Read once the app is complete (handlers are added after construction), as the stack is built.
        if self._handlers is None:
            by_class: dict[Any, Any] = {}
            by_status: dict[int, Any] = {}
            for key, handler in self._app.exception_handlers.items():
                if isinstance(key, int):
                    if key != 500:  # the server error handler is ServerErrorMiddleware's, never a route's
                        by_status[key] = handler
                elif key is not Exception:
                    by_class[key] = handler
            self._handlers = (by_class, by_status)
        return self._handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for route in self._routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                scope["app"] = self._app
                scope["router"] = self._app.router
                scope["starlette.exception_handlers"] = self._exception_handlers()
                await route.handle(scope, receive, send)
                return
        await self._fallback(scope, receive, send)


# The data-plane prefixes whose routes `DirectRoutes` serves (A2A agents, the OpenAI-compatible API).
DIRECT_PREFIXES = ("/a2a/", "/v1/")


class GatewayApp(FastAPI):
    """The admin API and documents on FastAPI; the data plane in front of its middleware stack.

    FastAPI's stack (error, telemetry, body-limit, exception and exit-stack middleware, then routing)
    cost about 0.2 ms of CPU per call on the pass-through path (bench/RESULTS.md); the MCP routes need
    none of it: they render their own errors. The A2A and LLM routes go through `DirectRoutes`, which
    keeps the exception handlers they rely on. Both keep the Host check (DNS rebinding).
    """

    mcp_front: ASGIApp | None = None
    direct_front: ASGIApp | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = query_without_null(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.mcp_front is not None:
            path: str = scope["path"]
            if scope["method"] in MCP_METHODS and path.startswith("/mcp"):
                params = mcp_path_params(path)
                if params is not None:
                    scope["path_params"] = params
                    scope["app"] = self
                    await self.mcp_front(scope, receive, send)
                    return
            elif self.direct_front is not None and path.startswith(DIRECT_PREFIXES):
                await self.direct_front(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> GatewayApp:
    """The ASGI application for `settings`; stages are built when the app starts.

    `span_exporter` receives every span, whatever `settings.tracing` says (tests, embedders).
    """
    gateway = build_gateway(settings, span_exporter)

    demo = demo_server() if settings.demo else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if demo is not None:
                await stack.enter_async_context(demo.session_manager.run())
            await stack.enter_async_context(gateway.bridge.session_manager.run())
            loop = asyncio.get_running_loop()

            # Registry changes may come from the poller's thread: resync on the event loop.
            def resync() -> None:
                loop.call_soon_threadsafe(gateway.sessions.sync, gateway.registry.servers())

            gateway.registry.on_change(resync)
            gateway.sessions.sync(gateway.registry.servers())
            poller = asyncio.create_task(_poll_registry(gateway.registry))
            policy_watch = asyncio.create_task(gateway.authorizer.watch())
            if gateway.metrics is not None and settings.metrics.port is not None:
                await stack.enter_async_context(
                    serve_metrics(gateway.metrics, settings.metrics.host, settings.metrics.port)
                )
            # What start-up built (about 200,000 objects: libraries, settings, stages) lives as long as
            # the process: keep it out of the cyclic GC, whose full passes over it stalled every call
            # in flight for about 180 ms (bench/RESULTS.md).
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
                for task in (poller, policy_watch):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await gateway.identity.aclose()
                if gateway.credentials is not None:
                    await gateway.credentials.aclose()
                await gateway.sessions.aclose()
                await gateway.mcp_upstream.aclose()
                await gateway.llm.aclose()
                await gateway.a2a.aclose()
                await gateway.budget_store.aclose()
                # Commit what the audit writer still holds before the process goes.
                await anyio.to_thread.run_sync(gateway.audit_log.close)
                if gateway.tracing is not None:
                    await anyio.to_thread.run_sync(gateway.tracing.shutdown)

    app = GatewayApp(title="agentgw", version=__version__, lifespan=lifespan)
    hosts = settings.trusted_hosts()
    if hosts == ["*"]:
        log.warning("no allowed_hosts or public_url: answering any Host header (DNS rebinding unchecked)")
    app.add_middleware(BodyLimit, limit=settings.admin_max_body_bytes)
    app.add_middleware(RememberedHostCheck, allowed_hosts=hosts)  # outermost: added last
    if demo is not None:
        app.router.routes.append(Mount("/_demo", app=demo.streamable_http_app(host=settings.host)))
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.http_status, headers=exc.headers)

    app.add_exception_handler(405, method_not_allowed)

    # The data plane is plain ASGI routes: no FastAPI validation on the hot path.
    mcp = McpIngress(
        gateway.registry, gateway.passthrough, gateway.bridge, gateway.authenticate, gateway.pipeline
    )
    app.mcp_front = RememberedHostCheck(TraceContext(mcp), hosts)
    # Still routed, for other methods (405) and for anything that walks the routes.
    app.router.routes.append(Route("/mcp", mcp, methods=sorted(MCP_METHODS)))
    app.router.routes.append(Route("/mcp/{server}", mcp, methods=sorted(MCP_METHODS)))
    direct = [*gateway.llm.routes(), *gateway.a2a.routes()]
    # /v1: OpenAI-compatible chat, embeddings, models; /a2a/<agent>: cards, JSON-RPC, HTTP+JSON.
    # Served ahead of the stack; still routed, for anything that walks the routes.
    app.direct_front = RememberedHostCheck(
        TraceContext(DirectRoutes(app, direct, super(GatewayApp, app).__call__)), hosts
    )
    app.router.routes.extend(direct)

    # Liveness: the process answers (nothing slow, no store). Readiness: it can serve calls now.
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        # The pid tells `serve --workers` processes apart (which one answered).
        return {
            "status": "ok",
            "version": __version__,
            "servers": len(gateway.registry.servers()),
            "pid": os.getpid(),
        }

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        assert gateway.readiness is not None
        ready, body = await gateway.readiness.report()
        return JSONResponse(body, status_code=200 if ready else 503, headers={"cache-control": "no-store"})

    app.include_router(
        registry_router(
            gateway.registry,
            read_guard=_admin_guard(gateway, "registry", "read"),
            write_guard=_admin_guard(gateway, "registry", "write"),
            # Running a command on the host is more than editing the registry: a grant of its own.
            exec_guard=_admin_guard(gateway, "exec", "write"),
            admission=settings.admission(),
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    app.include_router(
        budgets_router(
            gateway.budget_rules,
            gateway.budget_store,
            read_guard=_admin_guard(gateway, "budgets", "read"),
            write_guard=_admin_guard(gateway, "budgets", "write"),
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    app.include_router(
        audit_router(
            gateway.audit_log.engine,
            read_guard=_admin_guard(gateway, "audit", "read"),
            flush=gateway.audit_log.flush,
            check=gateway.audit_log.verify,
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    app.include_router(
        policy_router(
            gateway.authorizer,
            read_guard=_admin_guard(gateway, "policies", "read"),
            write_guard=_admin_guard(gateway, "policies", "write"),
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    if gateway.metrics is not None:
        app.include_router(metrics_router(gateway.metrics, _admin_guard(gateway, "metrics", "read")))
    app.include_router(
        api_key_router(
            gateway.identity.api_keys,
            gateway.identity.api_key_verifier,
            read_guard=_admin_guard(gateway, "keys", "read"),
            write_guard=_admin_guard(gateway, "keys", "write"),
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    app.include_router(
        clients_router(
            gateway.identity.list_clients,
            gateway.identity.revoke_client,
            read_guard=_admin_guard(gateway, "keys", "read"),
            write_guard=_admin_guard(gateway, "keys", "write"),
        ),
        dependencies=ADMIN_DEPENDENCIES,
        responses=GUARDED,
    )
    # Public OAuth documents: RFC 9728 metadata for every endpoint, the built-in authorization server.
    app.include_router(
        protected_resource_router(settings.base_url, gateway.registry, lambda: gateway.identity.issuers)
    )
    if gateway.identity.server is not None:
        app.include_router(oauth_router(gateway.identity.server))
        if settings.console.enabled:
            _add_console(app, gateway)
    return app


def _add_console(app: FastAPI, gateway: Gateway) -> None:
    """The web console at /console, logged into at the built-in authorization server as its own client."""
    server, settings = gateway.identity.server, gateway.settings
    assert server is not None
    server.add_client(
        BuiltinClient(
            client_id=CONSOLE_CLIENT_ID,
            redirect_uris=[f"{settings.base_url}/console/callback"],
            client_name="agentgw console",
        )
    )
    oauth = FastAPI()
    oauth.include_router(oauth_router(server))
    upstreams = (gateway.mcp_upstream, gateway.sessions, gateway.llm, gateway.a2a)
    console = Console(
        base_url=settings.base_url,
        authenticate=gateway.authenticate,
        authorizer=gateway.authorizer,
        oauth=oauth,
        audit_engine=gateway.audit_log.engine,
        audit_flush=gateway.audit_log.flush,
        audit_verify=gateway.audit_log.verify,
        registry=gateway.registry,
        budget_rules=gateway.budget_rules,
        budget_store=gateway.budget_store,
        health=lambda: _upstream_states(*upstreams),
        models=[route.name for route in settings.llm_routes],
        agents=[agent.name for agent in settings.a2a_agents],
    )
    app.include_router(console_router(console))
    app.mount("/console/static", console_static(), name="console-static")


async def _poll_registry(registry: RegistryStore) -> None:
    # Writes from other processes (the CLI, other nodes) bump a version row; pick them up.
    while True:
        await anyio.sleep(REGISTRY_POLL_S)
        try:
            await anyio.to_thread.run_sync(registry.refresh)
        except Exception:
            log.exception("registry refresh failed; serving the last snapshot")
