"""The routes of the one front door: the data plane (each protocol's ingress) first, then the control
plane (health, the admin API, the OAuth documents and endpoints)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from agentgw import __version__
from agentgw.admin.audit import audit_router
from agentgw.admin.budgets import budgets_router
from agentgw.admin.clients import clients_router
from agentgw.admin.policies import policy_router
from agentgw.api_contract import ADMIN_DEPENDENCIES, GUARDED, Guard
from agentgw.app.front import GatewayApp
from agentgw.app.gateway import Gateway, upstream_states
from agentgw.call import Principal
from agentgw.console import CONSOLE_CLIENT_ID, Console, console_router, console_static
from agentgw.errors import Forbidden
from agentgw.ingress.mcp.routes import METHODS as MCP_METHODS
from agentgw.ingress.mcp.routes import McpIngress, McpRoute
from agentgw.metrics import metrics_router
from agentgw.oauth.apikeys import api_key_router
from agentgw.oauth.config import BuiltinClient
from agentgw.oauth.metadata import protected_resource_router
from agentgw.oauth.server import oauth_router
from agentgw.registry.api import registry_router
from agentgw.registry.catalog import Catalog, default_namespace
from agentgw.registry.pins_api import pins_router
from agentgw.registry.read_api import registry_read_router

__all__ = ["admin_guard", "mount_control_plane", "mount_data_plane"]


def mount_data_plane(app: GatewayApp, gateway: Gateway) -> list[BaseRoute]:
    """Mount the MCP, LLM and A2A ingress routes; returns the routes that serve calls.

    They come first in the router, and are plain ASGI routes: no FastAPI validation on the hot path.
    """
    mcp = McpIngress(
        gateway.registry, gateway.passthrough, gateway.bridge, gateway.authenticate, gateway.pipeline
    )
    # /mcp...: MCP, both eras; /v1: OpenAI-compatible chat, embeddings, models;
    # /a2a/<agent>: cards, JSON-RPC, HTTP+JSON.
    data_plane: list[BaseRoute] = [McpRoute(mcp), *gateway.llm.routes(), *gateway.a2a.routes()]
    app.router.routes.extend(data_plane)
    # What the MCP route does not take (another method) is answered 405 by these, as for any path.
    app.router.routes.append(Route("/mcp", mcp, methods=sorted(MCP_METHODS)))
    app.router.routes.append(Route("/mcp/{server}", mcp, methods=sorted(MCP_METHODS)))
    return data_plane


def admin_guard(gateway: Gateway, area: str, act: str) -> Guard:
    """The dependency that admits a caller granted `act` on `admin:<area>` (401 without valid
    credentials, 403 without the grant)."""

    async def guard(request: Request) -> Principal:
        principal = await gateway.authenticate.principal(request.headers.get("authorization"))
        if not gateway.authorizer.decide(principal, f"admin:{area}", act).allowed:
            raise Forbidden(f"denied by policy: {act} on admin:{area} is not granted")
        return principal

    return guard


def mount_control_plane(app: GatewayApp, gateway: Gateway) -> None:
    """Mount health, the admin API (each area behind its own grants) and the OAuth routes."""
    app.include_router(_health_router(gateway))

    def grant(area: str, act: str) -> Guard:
        return admin_guard(gateway, area, act)

    admin: list[APIRouter] = [
        registry_router(
            gateway.registry,
            read_guard=grant("registry", "read"),
            write_guard=grant("registry", "write"),
            # Running a command on the host is more than editing the registry: a grant of its own.
            exec_guard=grant("exec", "write"),
            admission=gateway.settings.admission(),
        ),
        budgets_router(
            gateway.budget_rules,
            gateway.budget_store,
            read_guard=grant("budgets", "read"),
            write_guard=grant("budgets", "write"),
        ),
        audit_router(
            gateway.audit_log.engine,
            read_guard=grant("audit", "read"),
            flush=gateway.audit_log.flush,
            check=gateway.audit_log.verify,
        ),
        policy_router(
            gateway.authorizer, read_guard=grant("policies", "read"), write_guard=grant("policies", "write")
        ),
        api_key_router(
            gateway.identity.api_keys,
            gateway.identity.api_key_verifier,
            read_guard=grant("keys", "read"),
            write_guard=grant("keys", "write"),
        ),
        # Registered OAuth clients are credentials, like API keys: the same grants.
        clients_router(
            gateway.identity.list_clients,
            gateway.identity.revoke_client,
            read_guard=grant("keys", "read"),
            write_guard=grant("keys", "write"),
        ),
    ]
    if gateway.pins is not None:
        admin.append(
            pins_router(
                gateway.pins, read_guard=grant("registry", "read"), write_guard=grant("registry", "write")
            )
        )
    for router in admin:
        app.include_router(router, dependencies=ADMIN_DEPENDENCIES, responses=GUARDED)
    app.include_router(_registry_read(gateway))
    if gateway.metrics is not None:
        app.include_router(metrics_router(gateway.metrics, grant("metrics", "read")))
    # Public OAuth documents: RFC 9728 metadata for every endpoint, the built-in authorization server.
    app.include_router(
        protected_resource_router(
            gateway.settings.base_url, gateway.registry, lambda: gateway.identity.issuers
        )
    )
    if gateway.identity.server is not None:
        app.include_router(oauth_router(gateway.identity.server))
        if gateway.settings.console.enabled:
            _add_console(app, gateway)


def _add_console(app: GatewayApp, gateway: Gateway) -> None:
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
        health=lambda: upstream_states(*upstreams),
        pins=gateway.pins,
        models=[route.name for route in settings.llm_routes],
        agents=[agent.name for agent in settings.a2a_agents],
    )
    app.include_router(console_router(console))
    app.mount("/console/static", console_static(), name="console-static")


def _registry_read(gateway: Gateway) -> APIRouter:
    """The MCP Registry read API (/v0.1): what a caller may discover, decided as tools/list is."""
    settings = gateway.settings
    if gateway.catalog is None:  # published from the registry's snapshot, kept in step with it
        catalog = gateway.catalog = Catalog(gateway.registry.engine)
        catalog.sync(gateway.registry.servers())
        gateway.registry.on_change(lambda: catalog.sync(gateway.registry.servers()))

    async def principal_of(request: Request) -> Principal:
        # The registry describes the /mcp endpoints: a token for /mcp (or the gateway) reads it.
        principal = await gateway.authenticate.principal(
            request.headers.get("authorization"), endpoint="/mcp"
        )
        gateway.authorizer.refresh()
        return principal

    return registry_read_router(
        gateway.catalog,
        principal_of,
        gateway.authorizer.decide,
        base_url=settings.base_url,
        namespace=settings.registry.namespace or default_namespace(settings.base_url),
    )


def _health_router(gateway: Gateway) -> APIRouter:
    """Liveness: the process answers (nothing slow, no store). Readiness: it can serve calls now."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, Any]:
        # The pid tells `serve --workers` processes apart (which one answered).
        return {
            "status": "ok",
            "version": __version__,
            "servers": len(gateway.registry.servers()),
            "pid": os.getpid(),
        }

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        assert gateway.readiness is not None
        ready, body = await gateway.readiness.report()
        return JSONResponse(body, status_code=200 if ready else 503, headers={"cache-control": "no-store"})

    return router
