"""What the bridge keeps for each handshake-era client session: its log level and its subscriptions.

The state lives on the SDK's connection of that session (`Connection.state`), so it is the session's
alone, on the node that holds it, and ends with it (`Connection.exit_stack`). Nothing here is
looked up by a name a client sends, so no client can read or change another's.

Subscriptions are shared upstream: however many clients watch a resource, the upstream is subscribed
once, and unsubscribed when the last of them leaves. An update is relayed to each client that
watches the resource, with the URI that client subscribed to (namespaced where the endpoint prefixes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, get_args

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, LoggingLevel

from agentgw.errors import BadRequest

__all__ = [
    "LOG_LEVELS",
    "ClientSession",
    "Subscriptions",
    "UpstreamSubscriber",
    "at_or_above",
    "client_session",
]

log = logging.getLogger(__name__)

LOG_LEVELS: Final[tuple[LoggingLevel, ...]] = get_args(LoggingLevel)  # least to most severe
# A client's subscriptions, and the length of a URI it may subscribe to: both are the client's choice,
# and each subscription holds state on this node (and maybe upstream) for as long as the session.
MAX_SUBSCRIPTIONS: Final = 100
MAX_URI_CHARS: Final = 2048
_STATE_KEY: Final = "agentgw.bridge"


class UpstreamSubscriber(Protocol):
    """The upstream side: one subscription per (server, upstream URI)."""

    async def subscribe(self, server: str, uri: str) -> None: ...

    async def unsubscribe(self, server: str, uri: str) -> None: ...


@dataclass(eq=False)  # compared and hashed by identity: one per session
class ClientSession:
    """One client session's state (handshake eras)."""

    connection: Connection
    level: LoggingLevel | None = None  # None: the client asked for no log messages
    # The URI the client subscribed to -> (server, the upstream's URI).
    subscriptions: dict[str, tuple[str, str]] = field(default_factory=dict)

    def wants(self, level: Any) -> bool:
        """Whether a log message at `level` is at or above the level this client asked for."""
        return at_or_above(level, self.level)


def at_or_above(level: Any, threshold: Any) -> bool:
    """Whether `level` is a log level at or above `threshold` (never, when either is no level)."""
    return (
        level in LOG_LEVELS
        and threshold in LOG_LEVELS
        and LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)
    )


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    # The SDK exposes a request's connection to lowlevel handlers only through its session, privately.
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise MCPError(code=-32603, message="no client session to keep state for")
    return connection


def client_session(
    ctx: ServerRequestContext[Any, Any], subscriptions: Subscriptions | None = None
) -> ClientSession:
    """The state of the client session `ctx` belongs to (made on first use).

    Raises:
        MCPError: the request came without a connection (never on the bridge's transports).
    """
    connection = connection_of(ctx)
    state = connection.state.get(_STATE_KEY)
    if isinstance(state, ClientSession):
        return state
    state = connection.state[_STATE_KEY] = ClientSession(connection)
    if subscriptions is not None:
        connection.exit_stack.push_async_callback(subscriptions.release, state)
    return state


class Subscriptions:
    """Every client's resource subscriptions on this node, and the upstream subscriptions they share."""

    def __init__(self, upstream: UpstreamSubscriber) -> None:
        self._upstream = upstream
        # (server, upstream URI) -> the clients that watch it.
        self._watchers: dict[tuple[str, str], set[ClientSession]] = {}
        # Changes are rare; one at a time keeps "subscribed once upstream" true under concurrency.
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def subscribe(self, client: ClientSession, exposed: str, server: str, uri: str) -> None:
        """Subscribe `client` to `exposed` (the URI it asked for), which is `uri` of `server`.

        Raises:
            BadRequest: the URI is too long, or the client holds as many subscriptions as it may.
            GatewayError: the upstream could not be subscribed (the client is not subscribed either).
        """
        if len(exposed) > MAX_URI_CHARS:
            raise BadRequest(f"a URI to subscribe to is at most {MAX_URI_CHARS} characters")
        async with self._lock:
            if exposed in client.subscriptions:
                return
            if len(client.subscriptions) >= MAX_SUBSCRIPTIONS:
                raise BadRequest(f"a session holds at most {MAX_SUBSCRIPTIONS} subscriptions")
            key = (server, uri)
            if key not in self._watchers:
                await self._upstream.subscribe(server, uri)
                self._watchers[key] = set()
            self._watchers[key].add(client)
            client.subscriptions[exposed] = key

    async def unsubscribe(self, client: ClientSession, exposed: str) -> None:
        """End `client`'s subscription to `exposed`.

        Raises:
            MCPError: the client holds no subscription to that URI (invalid params).
        """
        async with self._lock:
            key = client.subscriptions.pop(exposed, None)
            if key is None:
                raise MCPError(code=INVALID_PARAMS, message="not subscribed to that URI")
            await self._leave(client, key)

    async def release(self, client: ClientSession) -> None:
        """End every subscription of a client whose session ended."""
        async with self._lock:
            keys = list(client.subscriptions.values())
            client.subscriptions.clear()
            for key in keys:
                await self._leave(client, key)

    async def _leave(self, client: ClientSession, key: tuple[str, str]) -> None:
        watchers = self._watchers.get(key)
        if watchers is None:
            return
        watchers.discard(client)
        if watchers:
            return
        del self._watchers[key]
        try:
            await self._upstream.unsubscribe(*key)
        except Exception as exc:  # the clients are gone either way; the upstream's updates are dropped
            log.info("upstream %s not unsubscribed from a resource: %s", key[0], type(exc).__name__)

    def watched(self) -> int:
        """How many (server, URI) pairs are subscribed upstream."""
        return len(self._watchers)

    def on_updated(self, server: str, uri: str) -> None:
        """An upstream said a resource changed: tell each client that watches it, by its own URI."""
        watchers = self._watchers.get((server, uri))
        if not watchers:
            return
        targets = [
            (client.connection, exposed)
            for client in watchers
            for exposed, key in client.subscriptions.items()
            if key == (server, uri)
        ]
        task = asyncio.get_running_loop().create_task(_notify(targets))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _notify(targets: list[tuple[Connection, str]]) -> None:
    for connection, exposed in targets:
        await connection.send_resource_updated(exposed)  # best effort: never raises
