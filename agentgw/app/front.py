"""The front door: the one ASGI application every request enters, and what it passes on the way in.

    GatewayApp            the ASGI application; every request enters through its `front`:
    RememberedHostCheck   the Host header against the allowed hosts (DNS rebinding), then
    DataPlane             each protocol's ingress routes, ahead of FastAPI's stack, or else
    FastAPI's stack       the control plane: its middleware (`BodyLimit` among it), exception
                          handlers and router

The data plane is served ahead of FastAPI's middleware stack because the stack costs every call CPU
that shows on the pass-through path's CPU per call, in alternating runs (decision 0905), while the
ingress adapters need none of it: they render their own errors in their protocol's shape and bound
their own bodies. The one thing of the stack they rely on, the app's exception handlers, `DataPlane`
applies with Starlette's own `ExceptionMiddleware`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentgw.api_contract import query_without_null
from agentgw.errors import GatewayError

__all__ = [
    "MAX_REMEMBERED_HOSTS",
    "BodyLimit",
    "DataPlane",
    "GatewayApp",
    "RememberedHostCheck",
    "gateway_error",
]

MAX_REMEMBERED_HOSTS = 64


def _host_headers(scope: Scope) -> list[bytes]:
    return [value for name, value in scope["headers"] if name == b"host"]


class RememberedHostCheck:
    """Starlette's `TrustedHostMiddleware`, with every Host value it let through remembered.

    The allowed hosts are fixed at start-up, so a value that passed once passes always: it goes
    straight to `app`, sparing every call Starlette's decoding of all headers and parsing of the Host
    value. Anything else, refusals and their answers included, is Starlette's.
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


class DataPlane:
    """The data plane's routes (each protocol's ingress), served ahead of FastAPI's middleware stack.

    A request one of `routes` fully matches is handed to it inside Starlette's own
    `ExceptionMiddleware`, with the app's exception handlers, so an escaping `GatewayError` or
    `HTTPException` is answered as under the stack. Anything else (no route, another method) goes to
    `fallback`, the stack, which answers 404 or 405 as for any path. An exception no handler takes
    reaches the server, which answers 500 as the stack's `ServerErrorMiddleware` would.
    """

    def __init__(self, app: FastAPI, routes: Sequence[BaseRoute], fallback: ASGIApp) -> None:
        # The app's handlers as its stack applies them: 500 and `Exception` are the server error's.
        handlers = {k: v for k, v in app.exception_handlers.items() if k not in (500, Exception)}
        self._app = app
        self._routes = [(route, ExceptionMiddleware(route.handle, handlers=handlers)) for route in routes]
        self._fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route, handled in self._routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    scope["app"] = self._app
                    scope["router"] = self._app.router
                    await handled(scope, receive, send)
                    return
        await self._fallback(scope, receive, send)


class GatewayApp(FastAPI):
    """The gateway's one ASGI application; every request enters through `front`.

    The front door is the Host check (DNS rebinding), then the data plane's routes (`DataPlane`);
    the control plane (admin API, OAuth, health, documents), and whatever no data-plane route fully
    matches, continue into FastAPI's middleware stack and router.

    The stack (server-error, telemetry, body-limit, exception and exit-stack middleware) is what the
    data plane skips, and why is said at the top of this module.
    """

    front: ASGIApp | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = query_without_null(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] != "lifespan":
            await self.front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's middleware stack and router, behind the front door."""
        await super().__call__(scope, receive, send)


async def gateway_error(_: Request, exc: Exception) -> JSONResponse:
    """A `GatewayError` a route let escape, answered in the `{"detail": ...}` shape of the admin API
    with its own status and headers (an OAuth challenge, `Retry-After`)."""
    assert isinstance(exc, GatewayError)
    return JSONResponse({"detail": exc.message}, status_code=exc.http_status, headers=exc.headers)
