"""`agentgw serve`: run the gateway."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway")
    add_common_options(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agentgw.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Decisions go to the audit log; casbin's and httpx's per-request lines would only repeat them.
    logging.getLogger("casbin").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    app = create_app(settings)
    base = settings.base_url
    print(f"agentgw listening on {base}", flush=True)
    for spec in app.state.gateway.registry.servers():
        print(f"  MCP server {spec.name!r}: {base}/mcp/{spec.name}", flush=True)
    if settings.demo:
        print(
            "  demo mode: SQLite, the built-in demo upstream and demo policy; anonymous callers allowed",
            flush=True,
        )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    return 0
