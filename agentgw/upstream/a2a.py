"""HTTP client for A2A agents: one pooled keep-alive client; messages travel as data, never rebuilt.

Streams (`SendStreamingMessage`, `SubscribeToTask`) get no read timeout: a task may stay silent for a
long time, and the stream ends when the agent ends it or the caller goes away (the ingress then
closes the upstream response).
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import orjson

from agentgw.errors import UpstreamError, UpstreamTimeout

__all__ = ["FORWARDED_REQUEST_HEADERS", "MAX_CARD_BYTES", "A2aHttpUpstream", "forwarded_headers"]

# A2A service parameters a caller may send to the agent through the gateway (`X-A2A-Extensions` is
# the 0.3 spelling). Authorization is never among them: the agent gets the gateway's own credential.
# `Agent-Run-Id` travels on so that an agent calling others can keep them in the same run.
FORWARDED_REQUEST_HEADERS = (
    "a2a-version",
    "a2a-extensions",
    "x-a2a-extensions",
    "last-event-id",
    "agent-run-id",
)
MAX_CARD_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 5.0


def forwarded_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The caller's A2A headers that travel upstream."""
    return {name: incoming[name] for name in FORWARDED_REQUEST_HEADERS if name in incoming}


class A2aHttpUpstream:
    """Sends requests to agents and fetches their cards, with transport errors mapped to `UpstreamError`."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

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
    ) -> httpx.Response:
        """Send one request; the response comes back unread (read or stream it, then close it).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: the agent cannot be reached.
        """
        read = None if stream else timeout_s
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s), read=read)
        request = self._client.build_request(method, url, headers=headers, content=body, timeout=timeout)
        try:
            return await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"A2A agent {agent!r} did not answer within {timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"A2A agent {agent!r} is unreachable") from exc

    async def fetch_card(self, url: str, timeout_s: float) -> object:
        """GET an agent card and parse it (at most `MAX_CARD_BYTES`).

        Raises:
            UpstreamTimeout: no answer within `timeout_s`.
            UpstreamError: unreachable, not HTTP 200, too large, or not JSON.
        """
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        request = self._client.build_request(
            "GET", url, headers={"accept": "application/json"}, timeout=timeout
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raise UpstreamError(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_CARD_BYTES:
                        raise UpstreamError(f"{url} answered more than {MAX_CARD_BYTES} bytes")
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{url} did not answer within {timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{url} is unreachable") from exc
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{url} answered something that is not JSON") from exc
