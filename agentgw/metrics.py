"""Prometheus metrics: what the pipeline saw of every call, and the state of what it depends on.

`Metrics` is the pipeline's `Observer`: told of each finished call with what every stage took, it
counts the call by protocol, action, upstream, decision and reason, and files each stage's own time
and the upstream's into histograms. Those counts are plain numbers kept on the event loop (the
pipeline's only thread) and read by `collect` at scrape time: `prometheus_client`'s own counters and
histograms take a lock on every update, a cost every call would pay (measured in decision 0513). The
library still does what it is good at: the registry, the exposition format and the process, platform
and GC collectors.

Labels stay low in cardinality whatever callers send: `upstream` is a name the registry, an LLM route
or an A2A agent defines (a name a caller made up is counted as `unknown`), `reason` and `decision` come
from the gateway's own error tree, budget names from budget rules. No principal label unless
`metrics.principal_labels` asks for one (then the subject, on the calls counter only).

Scraped at `/metrics` on the gateway's port, guarded by the `admin:metrics` read grant; or, with
`metrics.port`, also unauthenticated on that port of `metrics.host` (127.0.0.1 unless set otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from agentgw.api_contract import Guard
from agentgw.call import Call, Reply, Usage
from agentgw.errors import BudgetExceeded, GatewayError

__all__ = [
    "BUCKETS",
    "UNKNOWN",
    "Known",
    "Metrics",
    "MetricsSettings",
    "State",
    "metrics_router",
    "serve_metrics",
]

log = logging.getLogger(__name__)

# Upper bounds (seconds) of every latency histogram, from the gateway's own stages (far below a
# millisecond) to upstreams (seconds). One set for all keeps the series comparable.
BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# The `upstream` label of a call whose upstream name no registry entry, route or agent holds (a name
# the caller made up, refused as unknown).
UNKNOWN = "unknown"
# Upstream names remembered as known; past this many (a registry that keeps changing its names), the
# check is made again on each call instead of growing the memo.
MAX_KNOWN_UPSTREAMS = 4096
# Denials: the caller was refused (credentials, policy, budget); anything else that stops a call is
# an error.
_DENIED_STATUSES = frozenset({401, 403, 429})


class MetricsSettings(BaseModel):
    """The `metrics:` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    # Off: no counting on the call path and no /metrics.
    enabled: bool = True
    # Also serve /metrics here, without authentication, bound to `host`: for a scraper that holds no
    # gateway credential. Unset: /metrics on the gateway's port only, with the `admin:metrics` grant.
    port: int | None = Field(default=None, ge=1, le=65535)
    host: str = "127.0.0.1"
    # Count calls per principal (the subject) as well: one series per caller, so off by default.
    principal_labels: bool = False


# What `collect` reads of the gateway at scrape time (each a cheap in-memory read):
# the upstreams' last known state as `/readyz` reports it, by what it names;
Health = Callable[[], Mapping[str, Mapping[str, Any]]]
# the token cache's lookups, by (upstream, "hit" or "miss");
Lookups = Callable[[], Mapping[tuple[str, str], int]]
# whether a protocol's upstream name is one the gateway defines.
Known = Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class State:
    """What the scrape reads beside the call counts; any of it may be absent (a test's gateway)."""

    upstreams: Health | None = None
    token_cache: Lookups | None = None
    # Records accepted by the audit log and not yet in its database (the journal's lag).
    audit_backlog: Callable[[], int | None] | None = None
    # Why the audit log refuses records now (every call is then refused), or None.
    audit_problem: Callable[[], str | None] | None = None
    audit_commits: Callable[[], int] | None = None


def _row() -> list[float]:
    # One count per bucket (not cumulative; the last for +Inf), then the sum.
    return [0.0] * (len(BUCKETS) + 2)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.reason
    if isinstance(exc, Exception):
        return "internal_error"
    return "cancelled"  # CancelledError and the like: the caller went away


@dataclass(slots=True)
class _Upstream:
    """What a call to one upstream updates beyond the stage rows: found once per (protocol, name)."""

    protocol: str
    label: str
    row: list[float]


class Metrics:
    """Counts calls as the pipeline reports them (`finished`) and exposes them with `collect`."""

    def __init__(
        self,
        stages: Sequence[str],
        *,
        known: Known = lambda _protocol, _name: True,
        state: State | None = None,
        principal_labels: bool = False,
    ) -> None:
        self.stages = tuple(stages)
        self._known = known
        self.state = state or State()
        self._principals = principal_labels
        self._stage_rows = [_row() for _ in self.stages]
        self._calls: dict[tuple[str, ...], int] = {}
        self._upstream_rows: dict[tuple[str, str], list[float]] = {}
        self._refusals: dict[tuple[str, str], int] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._cost: dict[tuple[str, str], float] = {}
        # By (protocol, the call's upstream name), for names the gateway defines only.
        self._upstreams: dict[tuple[str, str], _Upstream] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        # The client's default collectors (process CPU, memory, open files; Python version; GC).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_Collector(self))

    # --- the call path (the pipeline's `Observer`) ---
    def finished(self, call: Call, spent: Sequence[float], outcome: Reply | BaseException) -> None:
        """Count `call`; `spent[i]`: seconds inside stage `i` and every stage after it (0: not reached)."""
        # Every call pays for this: plain list and dict updates, no locks (the event loop is the only
        # writer), no label lookups beyond one dict get.
        rows = self._stage_rows
        last = len(rows) - 1
        buckets = BUCKETS
        for index in range(last):
            inclusive = spent[index]
            if not inclusive:
                break
            own = inclusive - spent[index + 1]
            row = rows[index]
            row[bisect_left(buckets, own)] += 1
            row[-1] += own
        upstream = self._upstreams.get((call.protocol, call.upstream)) or self._upstream(call)
        took = spent[last]
        if took:
            slot = bisect_left(buckets, took)
            row = rows[last]
            row[slot] += 1
            row[-1] += took
            row = upstream.row
            row[slot] += 1
            row[-1] += took
        if isinstance(outcome, Reply):
            decision, reason = "allowed", outcome.status
            if outcome.streaming:
                outcome.on_settle(self._settled(upstream))
            elif outcome.usage is not None:
                self._used(upstream, outcome.usage)
        else:
            reason = _reason(outcome)
            if took:
                decision = "allowed"  # refused or failed upstream, after the policy let it through
            elif isinstance(outcome, GatewayError) and outcome.http_status in _DENIED_STATUSES:
                decision = "denied"
                if isinstance(outcome, BudgetExceeded) and isinstance(outcome.data, dict):
                    budget = (str(outcome.data.get("budget")), str(outcome.data.get("metric")))
                    self._refusals[budget] = self._refusals.get(budget, 0) + 1
            else:
                decision = "error"
        counted: tuple[str, ...] = (upstream.protocol, call.action, upstream.label, decision, reason)
        if self._principals:
            counted += (call.principal.subject if call.principal is not None else "",)
        calls = self._calls
        calls[counted] = calls.get(counted, 0) + 1

    def _upstream(self, call: Call) -> _Upstream:
        protocol, name = call.protocol, call.upstream
        label = name if self._known(protocol, name) else UNKNOWN
        row = self._upstream_rows.get((protocol, label))
        if row is None:
            row = self._upstream_rows[(protocol, label)] = _row()
        found = _Upstream(protocol, label, row)
        # A name the caller made up is looked up again next time rather than remembered: callers
        # must not grow this.
        if label != UNKNOWN and len(self._upstreams) < MAX_KNOWN_UPSTREAMS:
            self._upstreams[(protocol, name)] = found
        return found

    def _used(self, upstream: _Upstream, usage: Usage) -> None:
        key = (upstream.protocol, upstream.label)
        if usage.tokens:
            self._tokens[key] = self._tokens.get(key, 0) + usage.tokens
        if usage.cost:
            self._cost[key] = self._cost.get(key, 0.0) + usage.cost

    def _settled(self, upstream: _Upstream) -> Callable[[Usage], Awaitable[None]]:
        async def settle(usage: Usage) -> None:
            self._used(upstream, usage)

        return settle

    # --- the scrape ---
    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (on the event loop: the counts live there)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """The gateway's own metric families (the default collectors are registered beside them)."""
        calls_labels = ["protocol", "action", "upstream", "decision", "reason"]
        if self._principals:
            calls_labels.append("principal")
        yield _counter("agentgw_calls", "Calls through the pipeline, by outcome.", calls_labels, self._calls)
        yield _histogram(
            "agentgw_stage_duration_seconds",
            "Time spent in each pipeline stage itself (the stages after it excluded).",
            ["stage"],
            [((stage,), row) for stage, row in zip(self.stages, self._stage_rows, strict=True)],
        )
        yield _histogram(
            "agentgw_upstream_duration_seconds",
            "Time from forwarding a call to its upstream's answer (a stream's first bytes).",
            ["protocol", "upstream"],
            list(self._upstream_rows.items()),
        )
        yield _counter(
            "agentgw_budget_refusals",
            "Calls refused by a budget, by budget and metric.",
            ["budget", "metric"],
            self._refusals,
        )
        yield _counter(
            "agentgw_usage_tokens",
            "Tokens the upstreams reported for allowed calls.",
            ["protocol", "upstream"],
            self._tokens,
        )
        yield _counter(
            "agentgw_usage_cost",
            "Cost of allowed calls, as their routes price them.",
            ["protocol", "upstream"],
            self._cost,
        )
        yield from self._state()

    def _state(self) -> Iterator[Metric]:
        state = self.state
        if state.upstreams is not None:
            up = GaugeMetricFamily(
                "agentgw_upstream_up",
                "1 if the last request to an upstream (or its bridge session) found it working, as /readyz.",
                labels=["target"],
            )
            for target, entry in state.upstreams().items():
                up.add_metric([target], 1.0 if entry.get("ok") else 0.0)
            yield up
        if state.token_cache is not None:
            yield _counter(
                "agentgw_token_cache_lookups",
                "Upstream credential cache lookups, by upstream and result "
                "(hit, miss; shared: a miss the shared cache answered; evicted: dropped after another "
                "node's upstream refused it).",
                ["upstream", "result"],
                state.token_cache(),
            )
        if state.audit_backlog is not None and (backlog := state.audit_backlog()) is not None:
            yield GaugeMetricFamily(
                "agentgw_audit_journal_backlog",
                "Audit records in the journal, not yet in the database.",
                value=backlog,
            )
        if state.audit_problem is not None:
            yield GaugeMetricFamily(
                "agentgw_audit_refusing",
                "1 while the audit log refuses records (and so every call).",
                value=0.0 if state.audit_problem() is None else 1.0,
            )
        if state.audit_commits is not None:
            yield CounterMetricFamily(
                "agentgw_audit_commits", "Audit log transactions committed.", value=state.audit_commits()
            )


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()


_Labels = TypeVar("_Labels", bound=tuple[str, ...])


def _counter(
    name: str, documentation: str, labels: list[str], counts: Mapping[_Labels, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in list(counts.items()):
        family.add_metric(list(values), count)
    return family


def _histogram(
    name: str, documentation: str, labels: list[str], rows: Iterable[tuple[tuple[str, ...], list[float]]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    bounds = [*(repr(b) for b in BUCKETS), "+Inf"]
    for values, row in rows:
        buckets = []
        running = 0.0
        for bound, count in zip(bounds, row, strict=False):
            running += count
            buckets.append((bound, running))
        family.add_metric(list(values), buckets, row[-1])
    return family


def metrics_router(metrics: Metrics, read_guard: Guard) -> APIRouter:
    """`GET /metrics` on the gateway's port, for callers with the `admin:metrics` read grant."""
    router = APIRouter()
    read = Depends(read_guard)

    # Out of the OpenAPI document: it describes the admin API, and this is Prometheus's format.
    @router.get("/metrics", include_in_schema=False)
    async def scrape(_: Any = read) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


@contextlib.asynccontextmanager
async def serve_metrics(metrics: Metrics, host: str, port: int) -> AsyncIterator[None]:
    """Serve `GET /metrics` unauthenticated on `host:port`, on this event loop, while the block runs.

    Raises:
        OSError: the address cannot be bound.
    """

    # Imported here: the settings import this module, and only a gateway with `metrics.port` needs it.
    from aiohttp import web

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("metrics served at http://%s:%d/metrics", host, port)
        yield
    finally:
        await runner.cleanup()
