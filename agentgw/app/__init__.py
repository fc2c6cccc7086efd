"""`create_app(settings)`: the gateway as one ASGI application, wired in three steps.

gateway.py    build the gateway: stores, the pipeline's stages in their order, upstream clients,
              ingress adapters (`build_gateway`)
routes.py     mount the routes: each protocol's ingress, then health, admin API and OAuth
front.py      the one front door every request enters: the Host check, the control plane's
              body limit, FastAPI's exception handlers and router
lifespan.py   what runs while the gateway serves, and how it stops
"""

from __future__ import annotations

import logging

from opentelemetry.sdk.trace.export import SpanExporter
from starlette.routing import Mount

from agentgw import __version__
from agentgw.api_contract import method_not_allowed
from agentgw.app.front import (
    MAX_REMEMBERED_HOSTS,
    BodyLimit,
    DataPlane,
    GatewayApp,
    RememberedHostCheck,
    gateway_error,
)
from agentgw.app.gateway import Gateway, build_gateway
from agentgw.app.lifespan import lifespan
from agentgw.app.routes import mount_control_plane, mount_data_plane
from agentgw.demo.upstream import demo_server
from agentgw.errors import GatewayError
from agentgw.settings import Settings
from agentgw.tracing import TraceContext

__all__ = [
    "MAX_REMEMBERED_HOSTS",
    "DataPlane",
    "Gateway",
    "GatewayApp",
    "RememberedHostCheck",
    "build_gateway",
    "create_app",
]

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> GatewayApp:
    """The ASGI application for `settings`: the gateway is built now, its background work starts
    with the app's lifespan. `span_exporter` receives every span, whatever `settings.tracing` says
    (tests, embedders).

    Raises:
        PolicyError: the policy is unreadable, malformed, or empty when that is not allowed.
        ConfigError: an LLM route's, A2A agent's or MCP upstream's secret is missing or unreadable.
    """
    gateway = build_gateway(settings, span_exporter)
    demo = demo_server() if settings.demo else None
    app = GatewayApp(title="agentgw", version=__version__, lifespan=lifespan(gateway, demo))
    app.state.gateway = gateway

    data_plane = mount_data_plane(app, gateway)
    if demo is not None:
        app.router.routes.append(Mount("/_demo", app=demo.streamable_http_app(host=settings.host)))
    mount_control_plane(app, gateway)
    app.add_middleware(BodyLimit, limit=settings.admin_max_body_bytes)
    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(405, method_not_allowed)

    # The front door, built once the handlers it applies to the data plane are all added.
    hosts = settings.trusted_hosts()
    if hosts == ["*"]:
        log.warning("no allowed_hosts or public_url: answering any Host header (DNS rebinding unchecked)")
    # A caller's trace context is read before anything else, so every later log line names it.
    app.front = RememberedHostCheck(TraceContext(DataPlane(app, data_plane, fallback=app.stack)), hosts)
    return app
