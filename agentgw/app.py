"""`create_app(settings)`: the data plane (ingress routes), the admin API, and the lifespan that
builds every stage once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Mount, Route

from agentgw.call import Principal
from agentgw.demo.upstream import demo_server
from agentgw.errors import Forbidden, GatewayError
from agentgw.filters.audit import Audit, SqlAuditSink
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.budget import Budget
from agentgw.filters.credentials import Credentials
from agentgw.ingress.mcp.bridge import Bridge
from agentgw.ingress.mcp.passthrough import PassThrough, SessionTable
from agentgw.ingress.mcp.routes import McpIngress
from agentgw.pipeline import Pipeline, ordered
from agentgw.settings import Settings
from agentgw.storage import create_db, make_engine
from agentgw.upstream.mcp import McpHttpUpstream
from agentgw.upstream.mcp_sessions import UpstreamSessions
from registry.api import registry_router
from registry.store import RegistryStore

__all__ = ["Gateway", "create_app"]

log = logging.getLogger(__name__)

REGISTRY_POLL_S = 2.0


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


def build_gateway(settings: Settings) -> Gateway:
    """Build the stores and the pipeline.

    Raises:
        PolicyError: the policy is unreadable, malformed, or empty when that is not allowed.
    """
    engine = make_engine(settings.database_url)
    create_db(engine)
    registry = RegistryStore(engine)
    registry.sync_config(settings.servers, settings.virtual_servers)
    authorizer = CasbinAuthorizer(
        settings.policy.model,
        settings.policy.file,
        settings.policy.rules,
        allow_empty=settings.policy.allow_empty,
    )
    resource_metadata = f"{settings.base_url}/.well-known/oauth-protected-resource/mcp"
    authenticate = Authenticate(
        None,
        allow_anonymous=settings.allow_anonymous,
        challenge=f'Bearer resource_metadata="{resource_metadata}"',
    )
    pipeline = ordered(
        audit=Audit(SqlAuditSink(engine)),
        authenticate=authenticate,
        authorize=Authorize(authorizer),
        budget=Budget(),
        credentials=Credentials(),
    )
    upstream = McpHttpUpstream()
    passthrough = PassThrough(pipeline, upstream, SessionTable(), settings.max_body_bytes)
    sessions = UpstreamSessions()
    bridge = Bridge(
        pipeline,
        sessions,
        separator=settings.namespace_separator,
        list_timeout_s=settings.list_timeout_s,
        max_body_bytes=settings.max_body_bytes,
    )
    sessions.on_list_changed(bridge.on_list_changed)
    return Gateway(
        settings, registry, authenticate, authorizer, pipeline, upstream, passthrough, sessions, bridge
    )


def _admin_guard(gateway: Gateway, area: str, act: str) -> Callable[[Request], Awaitable[Principal]]:
    async def guard(request: Request) -> Principal:
        principal = await gateway.authenticate.principal(request.headers.get("authorization"))
        if not gateway.authorizer.decide(principal, f"admin:{area}", act).allowed:
            raise Forbidden(f"denied by policy: {act} on admin:{area} is not granted")
        return principal

    return guard


def create_app(settings: Settings) -> FastAPI:
    """The ASGI application for `settings`; stages are built when the app starts."""
    gateway = build_gateway(settings)

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
            try:
                yield
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
                await gateway.sessions.aclose()
                await gateway.mcp_upstream.aclose()

    app = FastAPI(title="agentgw", version="0.1.0", lifespan=lifespan)
    if demo is not None:
        app.router.routes.append(Mount("/_demo", app=demo.streamable_http_app(host=settings.host)))
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.http_status, headers=exc.headers)

    # The data plane is plain ASGI routes: no FastAPI validation on the hot path.
    mcp = McpIngress(gateway.registry, gateway.passthrough, gateway.bridge, gateway.authenticate)
    app.router.routes.append(Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]))
    app.router.routes.append(Route("/mcp/{server}", mcp, methods=["GET", "POST", "DELETE"]))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "servers": len(gateway.registry.servers())}

    app.include_router(
        registry_router(
            gateway.registry,
            read_guard=_admin_guard(gateway, "registry", "read"),
            write_guard=_admin_guard(gateway, "registry", "write"),
        )
    )
    return app


async def _poll_registry(registry: RegistryStore) -> None:
    # Writes from other processes (the CLI, other nodes) bump a version row; pick them up.
    while True:
        await anyio.sleep(REGISTRY_POLL_S)
        try:
            await anyio.to_thread.run_sync(registry.refresh)
        except Exception:
            log.exception("registry refresh failed; serving the last snapshot")
