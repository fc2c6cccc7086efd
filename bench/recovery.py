"""A gateway node losing its stores: what it refuses, that nothing slips through, how soon it recovers.

    python -m bench recovery [--fault-s 10] [--only postgres|redis]

One `agentgw serve` node: PostgreSQL holds its audit log, policy (`policy.database`) and registry;
Redis its budget counters (`budgets.store: redis`, one rule counting every run's calls) and MCP
sessions. Both are reached through proxies (tests/support/proxy.py). One client calls a tool of the
modern fixture upstream back to back (`resources/read`, a unique URI per call), through the node.

For each store and fault: 2 s of calls, then the fault for `--fault-s` seconds, then it is cleared,
and calls go on until the first one started after clearing works (and 1 s more). Faults: `cut`
(every connection reset and new ones refused for the whole outage: a crash or a restart) and
`pause` (connections open, no byte moves: a hung server). Reported per scenario: the calls that
overlapped the outage and how many were refused, each kind of refusal (HTTP status, JSON-RPC code,
message), calls the upstream received without an "allowed" audit record and beyond what the
budget counted (both must be 0), and `recovered`: from clearing to the end of the first call
started after it that worked.

Needs PostgreSQL at --postgres (a database is created and dropped) and Redis at --redis (a key
prefix of its own, deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio
import yaml

from agentgw.call import Principal
from agentgw.filters.budget import effective_budgets
from agentgw.records.budget import BudgetRule
from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery, iter_records
from agentgw.storage.budget import RedisBudgetStore
from conformance.fixtures.launch import free_port, start_process, start_upstream_sync
from tests.support.mcp import META, modern_headers
from tests.support.postgres import fresh_database
from tests.support.proxy import TcpProxy

__all__ = ["add_arguments", "main"]

GIVE_UP_S = 60.0  # after clearing: a node that has not served a call by then is reported so
RULE = BudgetRule(name="recovery-calls", per="run", calls=10_000_000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault-s", type=float, default=10.0)
    parser.add_argument("--only", choices=["postgres", "redis"])
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    refusal: str = ""  # "<status> <JSON-RPC code> <message>"


@dataclass
class Scenario:
    store: str
    fault: str
    run: str
    outcomes: list[Outcome] = field(default_factory=list)
    broken: float = 0.0
    cleared: float = 0.0
    unaudited: int = 0
    unbudgeted: int = 0
    forwarded: int = 0

    def during(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ended >= self.broken and o.started <= self.cleared]

    def recovered_s(self) -> float | None:
        after = [o for o in self.outcomes if o.started >= self.cleared and o.ok]
        return min(o.ended for o in after) - self.cleared if after else None


async def _main(args: argparse.Namespace) -> int:
    host, port = _host_port(args.postgres, 5432)
    redis_host, redis_port = _host_port(args.redis, 6379)
    prefix = f"agentgw-bench:{uuid.uuid4().hex}:"
    stores = [args.only] if args.only else ["postgres", "redis"]
    scenarios = [Scenario(s, f, f"{s}-{f}-{uuid.uuid4().hex[:6]}") for s in stores for f in ("cut", "pause")]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(fresh_database(args.postgres))
        pg_proxy = stack.enter_context(TcpProxy(port, host))
        redis_proxy = stack.enter_context(TcpProxy(redis_port, redis_host))
        upstream = stack.enter_context(start_upstream_sync("modern"))
        direct_db = args.postgres.rsplit("/", 1)[0] + f"/{database}"
        proxied_db = f"postgresql+psycopg://postgres@127.0.0.1:{pg_proxy.port}/{database}"
        config = {
            "data_dir": str(tmp / "state"),
            "allow_anonymous": True,
            "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "servers": [{"name": "modern", "url": f"{upstream}/mcp"}],
            "policy": {"database": True, "rules": ["p, anonymous, mcp:modern/*, *, allow"]},
            "budgets": {
                "store": "redis",
                "redis_prefix": prefix,
                "rules": [RULE.model_dump(exclude_none=True)],
            },
        }
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        gw_port = free_port()
        serve = [sys.executable, "-m", "agentgw", "serve", "--config", str(tmp / "gateway.yaml")]
        serve += ["--host", "127.0.0.1", "--port", str(gw_port), "--database-url", proxied_db]
        node = stack.enter_context(start_process(serve, gw_port))
        url = f"{node.url}/mcp/modern"
        proxies = {"postgres": pg_proxy, "redis": redis_proxy}
        async with httpx.AsyncClient(timeout=30) as http:
            for scenario in scenarios:
                await _run(http, url, scenario, proxies[scenario.store], args.fault_s)
                print(f"  {scenario.store} {scenario.fault}: done", file=sys.stderr, flush=True)
            received = (await http.get(f"{upstream}/_fixture/received")).json()
        await _check(scenarios, received, direct_db, args.redis, prefix)
        await _clean(args.redis, prefix)
    _report(scenarios, args.fault_s)
    return 0


def _host_port(url: str, default: int) -> tuple[str, int]:
    parsed = httpx.URL(url.replace("postgresql+psycopg", "postgresql"))
    return parsed.host or "127.0.0.1", parsed.port or default


async def _run(
    http: httpx.AsyncClient, url: str, scenario: Scenario, proxy: TcpProxy, fault_s: float
) -> None:
    """One client calling back to back; the fault starts 2 s in and is cleared `fault_s` later by a
    timeline of its own (a call that hangs does not hold it up)."""
    phase = {"cleared": False}

    async def timeline() -> None:
        await asyncio.sleep(2.0)
        scenario.broken = time.monotonic()
        await asyncio.to_thread(proxy.refuse if scenario.fault == "cut" else proxy.pause)
        await asyncio.sleep(fault_s)
        await asyncio.to_thread(proxy.resume)
        scenario.cleared = time.monotonic()
        phase["cleared"] = True

    faults = asyncio.create_task(timeline())
    n = 0
    stop_at: float | None = None
    while True:
        now = time.monotonic()
        if stop_at is not None and now >= stop_at:
            break
        if phase["cleared"] and now - scenario.cleared > GIVE_UP_S:
            break
        n += 1
        scenario.outcomes.append(
            await _call(http, url, f"fixture://items/{scenario.run}-{n}", n, scenario.run)
        )
        last = scenario.outcomes[-1]
        if stop_at is None and phase["cleared"] and last.ok and last.started >= scenario.cleared:
            stop_at = time.monotonic() + 1.0
    await faults


async def _call(http: httpx.AsyncClient, url: str, uri: str, n: int, run: str) -> Outcome:
    body = {"jsonrpc": "2.0", "id": n, "method": "resources/read", "params": {"uri": uri, "_meta": META}}
    headers = modern_headers("resources/read", uri) | {"agent-run-id": run}
    started = time.monotonic()
    try:
        response = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic(), False, f"no answer: {type(exc).__name__}")
    ended = time.monotonic()
    try:
        answer: dict[str, Any] = response.json()
    except ValueError:
        return Outcome(started, ended, False, f"{response.status_code} (no JSON)")
    if response.status_code == 200 and "result" in answer:
        return Outcome(started, ended, True)
    error = answer.get("error") or {}
    return Outcome(
        started, ended, False, f"{response.status_code} {error.get('code')} {error.get('message')}"
    )


async def _check(
    scenarios: list[Scenario], received: list[dict[str, Any]], database: str, redis_url: str, prefix: str
) -> None:
    """What the upstream received, against the audit log and the budget counters (read directly)."""
    engine = make_engine(database)
    budgets = RedisBudgetStore(redis_url, prefix)
    try:
        for scenario in scenarios:
            start = f"fixture://items/{scenario.run}-"
            seen = {r["uri"] for r in received if (r.get("uri") or "").startswith(start)}
            records = iter_records(engine, AuditQuery(decision="allowed", run_id=scenario.run))
            audited = {r["resource"].removeprefix("mcp:modern/resource/") for r in records}
            [line] = await effective_budgets(
                [RULE], budgets, Principal("anonymous"), scenario.run, time.time()
            )
            counted = line["used"]
            assert isinstance(counted, int)
            scenario.forwarded = len(seen)
            scenario.unaudited = len(seen - audited)
            scenario.unbudgeted = max(0, len(seen) - counted)
    finally:
        await budgets.aclose()
        engine.dispose()


def _report(scenarios: list[Scenario], fault_s: float) -> None:
    print(f"\none node, one client calling back to back, each store broken for {fault_s:g} s")
    print(
        f"{'store':<9} {'fault':<6} {'during':>6} {'refused':>7} {'forwarded':>9} {'unaudited':>9}"
        f" {'unbudgeted':>10} {'recovered s':>11}"
    )
    for s in scenarios:
        during = s.during()
        recovered = s.recovered_s()
        shown = f"{recovered:.2f}" if recovered is not None else f">{GIVE_UP_S:.0f}"
        print(
            f"{s.store:<9} {s.fault:<6} {len(during):>6} {sum(not o.ok for o in during):>7}"
            f" {s.forwarded:>9} {s.unaudited:>9} {s.unbudgeted:>10} {shown:>11}"
        )
    print("\nrefusals during each outage (count, then HTTP status, JSON-RPC code, message):")
    for s in scenarios:
        kinds = Counter(o.refusal for o in s.during() if not o.ok)
        slowest = max((o.ended - o.started for o in s.during() if not o.ok), default=0.0)
        print(f"{s.store} {s.fault} (slowest refusal {slowest:.2f} s):")
        for refusal, count in kinds.most_common():
            print(f"  {count:>5}  {refusal[:160]}")


async def _clean(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()
