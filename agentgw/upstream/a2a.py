"""HTTP client for A2A agents: one pooled keep-alive client; messages travel as data, never rebuilt.

Streams (`SendStreamingMessage`, `SubscribeToTask`) get no read timeout: a task may stay silent for a
long time, and the stream ends when the agent ends it or the caller goes away (the ingress then
closes the upstream response).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from agentgw.call import RUN_ID_HEADER
from agentgw.errors import UpstreamError
from agentgw.registry.models import UpstreamLimits
from agentgw.upstream.http import HttpClient, UpstreamResponse, UpstreamState

__all__ = ["FORWARDED_REQUEST_HEADERS", "MAX_CARD_BYTES", "A2aHttpUpstream", "forwarded_headers"]

# A2A service parameters a caller may send to the agent through the gateway (`X-A2A-Extensions` is
# the 0.3 spelling). Authorization is never among them: the agent gets the gateway's own credential.
# `Agent-Run-Id` travels on so that an agent calling others can keep them in the same run.
FORWARDED_REQUEST_HEADERS = (
    "a2a-version",
    "a2a-extensions",
    "x-a2a-extensions",
    "last-event-id",
    RUN_ID_HEADER,
)
MAX_CARD_BYTES = 1024 * 1024
_CARD_HEADERS = {"accept": "application/json"}


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The caller's A2A headers that travel upstream."""
    return {name: incoming[name] for name in FORWARDED_REQUEST_HEADERS if name in incoming}


class A2aHttpUpstream:
    """Sends requests to agents and fetches their cards, with transport errors mapped to `UpstreamError`."""

    def __init__(self, http: HttpClient | None = None) -> None:
        self._http = http or HttpClient()

    async def aclose(self) -> None:
        await self._http.aclose()

    def states(self) -> dict[str, UpstreamState]:
        """What the last request to each agent found."""
        return self._http.states()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        timeout_s: float,
        stream: bool,
        agent: str,
        limits: UpstreamLimits | None = None,
    ) -> UpstreamResponse:
        """Send one request; the response comes back unread (read or stream it, then close it).

        Raises:
            UpstreamBusy: no connection to the agent free within its short wait; nothing was sent.
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the agent cannot be reached.
        """
        return await self._http.send(
            method,
            url,
            headers,
            body,
            timeout_s=timeout_s,
            who=f"A2A agent {agent!r}",
            read_timeout=not stream,
            stream=stream,
            limits=limits,
        )

    async def fetch_card(self, url: str, timeout_s: float) -> object:
        """GET an agent card and parse it (at most `MAX_CARD_BYTES`).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: unreachable, not HTTP 200, too large, or not JSON.
        """
        response = await self._http.send("GET", url, _CARD_HEADERS, None, timeout_s=timeout_s, who=url)
        try:
            if response.status_code != 200:
                raise UpstreamError(f"{url} answered HTTP {response.status_code}")
            body = await response.aread(MAX_CARD_BYTES)
        finally:
            await response.aclose()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{url} answered something that is not JSON") from exc
