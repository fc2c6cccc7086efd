"""The floor: a bare forwarding proxy on the gateway's own server and client, with no pipeline.

    python -m bench floor --port P --upstream http://127.0.0.1:U

Each POST to `/mcp/<name>` goes to the upstream's `/mcp`, `/a2a/<name>` to `/a2a`, and `/v1/...`
unchanged, with one pooled aiohttp session, on uvicorn with uvloop and httptools: the parts
`agentgw serve` runs on, and nothing else (no authentication, policy, budget, audit or credentials;
no limits or checks). `python -m bench compare --floor` measures it beside the gateway, so that what
the pipeline costs is the difference between the two rows, on the same machine in the same run.
Not a proxy to deploy: it forwards every header but the hop-by-hop ones and checks nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import aiohttp

__all__ = ["Floor", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP: Final = frozenset(
    {b"host", b"connection", b"content-length", b"transfer-encoding", b"keep-alive"}
)
RETURNED: Final = ("content-type", "mcp-session-id")


def upstream_path(path: str) -> str | None:
    """The upstream path for a gateway-style path, or None where the floor serves nothing."""
    if path.startswith("/mcp/"):
        return "/mcp"
    if path.startswith("/a2a/"):
        return "/a2a"
    if path.startswith("/v1/"):
        return path
    return None


class Floor:
    """The ASGI app: read the body, send it upstream, answer with what came back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to start
        target = upstream_path(scope["path"])
        if target is None or scope["method"] != "POST":
            await _answer(send, 404, b"", [])
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self._session is None:
            self._session = aiohttp.ClientSession(skip_auto_headers=("Accept-Encoding",))
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k not in HOP_BY_HOP}
        async with self._session.post(f"{self.upstream}{target}", data=body, headers=headers) as response:
            content = await response.read()
            returned = [(k.encode(), response.headers[k].encode()) for k in RETURNED if k in response.headers]
            await _answer(send, response.status, content, returned)


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(port: int, upstream: str, host: str = "127.0.0.1") -> None:
    """Serve the floor on `host:port` until interrupted, with `agentgw serve`'s server options."""
    import uvicorn

    uvicorn.run(
        Floor(upstream),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        lifespan="off",
    )
