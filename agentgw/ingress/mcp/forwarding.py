"""Bridged sessions held by another gateway node: a request for one is sent on to that node.

The bridge's handshake-era sessions (`Mcp-Session-Id` on `/mcp`, virtual servers, stdio and SSE
upstreams) and its HTTP+SSE sessions live in the SDK session manager of the process that opened them.
Their bindings (sessions.py) are shared in Redis and name that process's node URL as what is behind
the session. A node that gets a request for a session another node holds sends the HTTP request on
to that node, Authorization header included, and streams its answer back. The owner checks
everything again as for any request (credentials, the binding's principal): the forwarding node
decides nothing but where the request goes.

`agentgw-forwarded` marks a forwarded request. It only stops forwarding: the node that receives it
serves the request as its own, so a caller who sets it gains nothing (a session it names is then
unknown on every node but its owner, and the checks run as always).

Owner unreachable (killed, gone): its SDK sessions are lost with it. The binding is dropped and the
client gets 404, the protocol's answer for a lost session, so it starts a new one. Waiting for the
owner is bounded (connection, then the answer's start); a started stream may stay silent for as long
as the client keeps it open, as it would on the owner itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

from agentgw.errors import GatewayError, SessionNotFound, UpstreamTimeout, UpstreamUnreachable
from agentgw.ingress.body import read_body_asgi
from agentgw.ingress.relay import RelayResponse
from agentgw.upstream.http import HttpClient, UpstreamResponse

__all__ = ["FORWARDED_HEADER", "Forwarder", "node_url_error"]

log = logging.getLogger(__name__)

FORWARDED_HEADER = "agentgw-forwarded"
# About one connection, not the request (RFC 9110 7.6.1), or recomputed for the next hop.
_NOT_SENT_ON = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        FORWARDED_HEADER,
    }
)
_NOT_RELAYED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "trailer"}
)


def node_url_error(url: str) -> str | None:
    """Why `url` cannot be a node's own URL (None when it can): plain http(s) to a loopback or private
    IP address, so nothing but the operator's own network is ever sent a caller's request."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or parts.hostname is None or port is None:
        return "must be http(s)://<address>:<port>"
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username or parts.password:
        return "must be the node's base URL, nothing after the port"
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return "the host must be an IP address (a name could resolve anywhere)"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # judged as the IPv4 address it reaches
    # Link-local counts as private to `ipaddress`, but it is where cloud metadata services answer.
    if address.is_unspecified or address.is_link_local or not (address.is_loopback or address.is_private):
        return "the address must be loopback or private (not link-local)"
    return None


class Forwarder:
    """Sends requests for sessions other nodes hold on to those nodes.

    `me` is this node's own URL, which its bindings name; `wait_s` bounds the wait for the owner's
    answer to start; bodies are read up to `max_body_bytes`, as the owner would read them.
    """

    def __init__(
        self, me: str, *, wait_s: float, max_body_bytes: int, http: HttpClient | None = None
    ) -> None:
        self.me = me.rstrip("/")
        self._wait_s = wait_s
        self._max_body = max_body_bytes
        self._http = http or HttpClient()

    async def aclose(self) -> None:
        await self._http.aclose()

    def elsewhere(self, owner: str, headers: Mapping[str, str]) -> bool:
        """Whether a request for a session bound to `owner` goes to another node: `owner` is another
        node's URL and the request was not forwarded already (it is never forwarded twice).

        The URL is checked again although only nodes write bindings: a caller's credentials go there.
        """
        return owner != self.me and FORWARDED_HEADER not in headers and node_url_error(owner) is None

    async def forward(
        self,
        owner: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Mapping[str, str],
        *,
        lost: Callable[[], Awaitable[None]],
        body: bytes | None = None,
    ) -> None:
        """Send the request on to `owner` and stream its answer back; `body` when already read.

        Raises:
            SessionNotFound: the owner cannot be reached or did not answer in time: the session is
                lost (`lost` has been awaited to drop its binding).
            UpstreamBusy: too many requests to the owner are open; nothing was sent.
            UpstreamError: the connection to the owner broke after the request may have been sent.
            PayloadTooLarge, UnsupportedMediaType: the body, read here.
        """
        method = scope["method"]
        if body is None and method == "POST":
            body = await read_body_asgi(headers, receive, self._max_body)
        query = scope.get("query_string", b"")
        url = owner + scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        # Host goes along: the owner answers to the same names as this node (one config).
        sent = {k: v for k, v in headers.items() if k not in _NOT_SENT_ON} | {FORWARDED_HEADER: self.me}
        try:
            async with asyncio.timeout(self._wait_s):
                answer = await self._http.send(
                    method,
                    url,
                    sent,
                    body,
                    timeout_s=self._wait_s,
                    who=f"gateway node {owner}",
                    read_timeout=False,
                    stream=method == "GET",
                )
        except (UpstreamUnreachable, UpstreamTimeout, TimeoutError) as exc:
            log.warning("a bridged session is lost: its node %s did not answer (%s)", owner, exc)
            await _drop(lost)
            raise SessionNotFound("session not found: start a new session with initialize") from exc
        if answer.status_code == 404:
            # The owner no longer holds it (restarted at the same URL, or the session ended there).
            await _drop(lost)
        relayed = {k: v for k, v in answer.headers.items() if k not in _NOT_RELAYED}
        response = RelayResponse(
            _relayed(answer, owner), answer.aclose, status_code=answer.status_code, headers=relayed
        )
        await response(scope, receive, send)


async def _drop(lost: Callable[[], Awaitable[None]]) -> None:
    try:
        await lost()
    except GatewayError as exc:  # the binding expires on its own
        log.warning("a lost session stays bound until it expires: %s", exc.message)


async def _relayed(answer: UpstreamResponse, owner: str) -> AsyncIterator[bytes]:
    """The owner's answer as it arrives; one the owner breaks off ends here, as it ended there."""
    with contextlib.suppress(GatewayError):
        async for chunk in answer.aiter_raw():
            yield chunk
        return
    log.info("node %s broke off a forwarded answer", owner)
