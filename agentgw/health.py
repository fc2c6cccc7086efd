"""Readiness: can this gateway serve calls now? (`/readyz`; `/healthz` only says the process answers.)

The gateway fails closed: a call is refused while its policy, budget store or audit log cannot be
used, so the gateway is ready only while all three can. Each is probed with a short timeout, and
one round of probes serves every `/readyz` request for `TTL_S` (a load balancer polling many nodes
must not become the stores' load). Upstreams are reported, never probed: what the last request to
each found (the HTTP clients keep it as they go), and whether the bridge's session to each is up.
They do not decide readiness: an upstream that is down is down for every node alike, and the
gateway still serves the others (its callers get a clear error for that one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from agentgw.errors import GatewayError

__all__ = ["PROBE_TIMEOUT_S", "TTL_S", "Probe", "Readiness"]

log = logging.getLogger(__name__)

TTL_S = 2.0
PROBE_TIMEOUT_S = 2.0

# Raises when the store cannot be used.
Probe = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Report:
    ready: bool
    body: dict[str, Any]
    at: float


def _reason(exc: BaseException, timeout_s: float) -> str:
    # Gateway errors are written to be shown; a driver's message may name hosts and users: only its kind.
    if isinstance(exc, GatewayError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g}s"
    return type(exc).__name__


class Readiness:
    """Probes the stores (at most once per `ttl_s`) and reports them with the upstreams' last state."""

    def __init__(
        self,
        stores: Mapping[str, Probe],
        upstreams: Callable[[], dict[str, dict[str, Any]]],
        *,
        ttl_s: float = TTL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stores = dict(stores)
        self._upstreams = upstreams
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._last: _Report | None = None
        self._lock = anyio.Lock()

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of `/readyz`)."""
        last = self._last
        if last is None or self._clock() - last.at >= self._ttl_s:
            async with self._lock:  # one round of probes for every request that arrives meanwhile
                last = self._last
                if last is None or self._clock() - last.at >= self._ttl_s:
                    last = await self._probe()
                    self._last = last
        body = dict(last.body)
        body["upstreams"] = self._upstreams()
        return last.ready, body

    async def _probe(self) -> _Report:
        stores: dict[str, dict[str, Any]] = {}
        for name, probe in self._stores.items():
            try:
                with anyio.fail_after(self._timeout_s):
                    await probe()
            except Exception as exc:
                log.warning("readiness: %s is failing: %s", name, exc)
                stores[name] = {"ok": False, "reason": _reason(exc, self._timeout_s)}
            else:
                stores[name] = {"ok": True}
        ready = all(s["ok"] for s in stores.values())
        return _Report(ready, {"status": "ready" if ready else "not_ready", "stores": stores}, self._clock())
