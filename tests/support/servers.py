"""Real upstreams for client tests: an ASGI app served by uvicorn on 127.0.0.1, in the test's loop.

    server = LocalServer()                      # the port is bound now: build URLs from server.url
    scripted = Scripted(lambda request: Answer(200, [b"{}"]))
    async with server.serve(scripted):
        ...                                     # requests to server.url get the scripted answers

In-process, so a test can script the answers and see what was received; over a real socket, so the
gateway's own HTTP client (aiohttp) is what talks to it, with real breaks and real disconnects.
`LocalServer(tls=cert)` serves https with a trustme certificate (`tls_ca()` makes the CA).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import trustme
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["Answer", "LocalServer", "Received", "Scripted", "tls_ca", "unused_url"]

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 5.0


def unused_url() -> str:
    """A URL where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return f"http://{HOST}:{sock.getsockname()[1]}"


def tls_ca() -> trustme.CA:
    """A throwaway certificate authority: `ca.issue_cert("127.0.0.1")` for a server, and
    `ca.configure_trust(ssl.create_default_context())` for a client that trusts it."""
    return trustme.CA()


class LocalServer:
    """A listening socket on 127.0.0.1, and uvicorn serving an app on it while `serve` is open."""

    def __init__(self, tls: trustme.LeafCert | None = None) -> None:
        self.socket = socket.socket()
        self.socket.bind((HOST, 0))
        # Listening at once: a connection made before uvicorn starts waits in the backlog.
        self.socket.listen(128)
        self.port: int = self.socket.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{HOST}:{self.port}"
        self._tls = tls

    def _tls_context(self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        assert self._tls is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.configure_cert(context)
        return context

    @asynccontextmanager
    async def serve(self, app: ASGIApp) -> AsyncIterator[None]:
        config = uvicorn.Config(
            app,
            log_config=None,
            ws="none",
            timeout_graceful_shutdown=1,
            ssl_context_factory=self._tls_context if self._tls is not None else None,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[self.socket]))
        try:
            yield
        finally:
            server.should_exit = True
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await task
            finally:
                self.socket.close()


@dataclass
class Received:
    """One request as the upstream saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    content: bytes
    client_port: int  # the same port twice: the client kept the connection alive


@dataclass
class Answer:
    """What the upstream answers: `status`, `headers`, then `chunks` one by one, then its `end`.

    `end`: `end` finishes cleanly; `drop` breaks the connection mid-body; `hang` stays silent until
    the client goes away; `mute` does the same before sending even the status line. `closed` is set
    when the upstream is done with the request: it finished, or it saw the client go away.
    """

    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    end: Literal["end", "drop", "hang", "mute"] = "end"
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedDrop(Exception):
    """Raised by the scripted upstream to break its connection (uvicorn closes it mid-body)."""


class Scripted:
    """An ASGI upstream that answers each request with what `answer` returns for it."""

    def __init__(self, answer: Callable[[Received], Answer]) -> None:
        self.answer = answer
        self.received: list[Received] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        content = b""
        more = True
        while more:
            message = await receive()
            content += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = Received(scope["method"], scope["path"], headers, content, scope["client"][1])
        self.received.append(request)
        answer = self.answer(request)
        try:
            if answer.end == "mute":
                await _until_disconnect(receive)
                return
            raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
            await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
            for chunk in answer.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if answer.end == "drop":
                raise ScriptedDrop("the scripted upstream breaks its connection here")
            if answer.end == "hang":
                await _until_disconnect(receive)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            answer.closed.set()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
