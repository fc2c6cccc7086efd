"""Direct to the upstream vs through the gateway, side by side, in one run.

    python -m bench compare [--calls N] [--concurrency 1,10,50] [--kind mcp|a2a|llm]
                            [--era modern|legacy] [--upstream fast|sdk] [--memory-run N]
                            [--json FILE] [--no-bridge] [--anonymous] [--no-budget]
                            [--redis-url URL] [--workers N] [--serve-args "..."] [--floor]
                            [--flush-s S]

Starts the fixture upstream (`fast`: bench/upstream.py; `sdk`: the `mcp`-SDK fixture the tests use)
and the gateway (`python -m agentgw serve`, from the current directory, on free 127.0.0.1 ports, with
every pipeline stage this checkout has switched on), warms both up, then at each concurrency runs:
- `direct`: straight to the upstream's /mcp;
- `floor` (with `--floor`): through a bare forwarding proxy on the gateway's server and client with no
  pipeline (bench/floor.py), the least any gateway built on them could cost;
- `gateway`: the pass-through path /mcp/bench;
- `bridge`: the merged catalog /mcp (tool `bench__echo`), the bridge (2026-07-28: its own path).
With `--kind a2a` (`llm`) the rows are the fixture's /a2a (/v1/chat/completions) and the gateway's
/a2a/bench (/v1/chat/completions, model `bench`).
For the other rows it reports the ratio of throughput to direct, the added p50/p99 latency, and the
proxy's CPU time per call (utime+stime of the gateway's or the floor's process tree, from /proc).
`--workers N` serves with N worker processes (Redis at 127.0.0.1:6379/0 unless `--redis-url` says).
`--memory-run N` ends with N calls through the pass-through path and reports the gateway's RSS before
and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import yaml

from bench.load import ERAS, Era, Kind, Result, http_client, install_uvloop, run, workload
from conformance.fixtures.launch import FixtureProcess, free_port, free_ports, start_process

__all__ = ["Row", "Setup", "add_arguments", "compare", "main"]

SERVER: Final = "bench"
TOOL: Final = "echo"
MODEL: Final = "bench"  # the LLM route's virtual model name
SUBJECT: Final = "user:bench"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KB: Final = os.sysconf("SC_PAGE_SIZE") // 1024
# Shorter than the load generator's default: a stuck gateway should fail a comparison quickly.
REQUEST_TIMEOUT_S: Final = 10.0


# --- /proc: CPU and memory of a process tree ---------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn workers are children of the gateway process)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants, in seconds."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after "pid (comm)"
    return ticks / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` and its live descendants, in MiB."""
    pages = 0
    for p in process_tree(pid):
        try:
            pages += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
    return pages * PAGE_KB / 1024


# --- what the gateway runs with ------------------------------------------------------------------------


@dataclass
class Setup:
    """How the gateway under test is configured, and what that switches on."""

    config: dict[str, Any]
    stages: list[str]
    token: str | None = None


def _settings_fields() -> set[str]:
    from agentgw.settings import Settings

    return set(Settings.model_fields)


def _has_token_command() -> bool:
    return importlib.util.find_spec("agentgw.cli.token") is not None


def gateway_setup(
    upstream_url: str,
    port: int,
    *,
    anonymous: bool = False,
    budget: bool = True,
    redis_url: str | None = None,
    kind: Kind = "mcp",
    flush_s: float | None = None,
    metrics: bool = True,
) -> Setup:
    """A config with every stage this checkout has, switched on; and the names of those stages.

    Identity is a JWT from the gateway's built-in issuer where this checkout has `agentgw token issue`
    (see `issue_token`), else anonymous callers; budgets are on where the settings have them.
    """
    fields = _settings_fields()
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "servers": [{"name": SERVER, "url": f"{upstream_url}/mcp"}],
        "policy": {
            # A realistic small policy: a role grant, a deny that must be checked, an unrelated rule.
            "rules": [
                f"p, role:bench, mcp:{SERVER}/*, call, allow",
                f"p, role:bench, mcp:{SERVER}/*, list, allow",
                f"p, *, mcp:{SERVER}/delete_everything, call, deny",
                "p, role:ops, mcp:other/*, *, allow",
                f"p, role:bench, llm:{MODEL}, *, allow",
                f"p, role:bench, a2a:{SERVER}/*, *, allow",
                f"g, {SUBJECT}, role:bench",
                "g, anonymous, role:bench",
            ]
        },
        "log_level": "WARNING",
    }
    if kind == "llm":
        if "llm_routes" not in fields:
            raise RuntimeError("this checkout has no LLM routes (`llm_routes` in the settings)")
        route = {
            "name": MODEL,
            "base_url": f"{upstream_url}/v1",
            "model": MODEL,
            "credential": {"mode": "none"},
        }
        config["llm_routes"] = [route]
    if kind == "a2a":
        if "a2a_agents" not in fields:
            raise RuntimeError("this checkout has no A2A agents (`a2a_agents` in the settings)")
        config["a2a_agents"] = [{"name": SERVER, "card": agent_card(upstream_url), "default_skill": TOOL}]
    if anonymous or not _has_token_command():
        config["allow_anonymous"] = True
        stages = ["identity (anonymous)"]
    else:
        stages = ["identity (JWT, built-in issuer)"]
    stages += ["policy (Casbin)"]
    if budget and "budgets" in fields:
        # Generous enough never to stop a run, so that the budget stage does its full work per call.
        config["budgets"] = {
            "rules": [{"name": "bench", "per": "subject", "window": "day", "calls": 1_000_000_000}]
        }
        stages.append("budget")
        if flush_s is not None:
            config["budgets"]["flush_s"] = flush_s
        if redis_url:
            # A prefix of its own per run: counters of earlier runs never count against this one.
            prefix = f"agentgw-bench:{port}:"
            config["budgets"] |= {"store": "redis", "redis_url": redis_url, "redis_prefix": prefix}
    stages.append("audit")
    if "metrics" in fields:
        # On by default in the gateway; `--no-metrics` prices the counting.
        config["metrics"] = {"enabled": metrics}
        if metrics:
            stages.append("metrics")
    if redis_url:
        # Shared state for several workers (`--serve-args "--workers 2"`).
        config["redis_url"] = redis_url
    return Setup(config, stages)


def agent_card(upstream_url: str) -> dict[str, Any]:
    """The A2A 1.0 card of the fixture upstream's agent (one skill, `echo`, over JSON-RPC)."""
    return {
        "name": "bench",
        "description": "Answers every message with its own text parts.",
        "version": "1.0.0",
        "supportedInterfaces": [
            {"url": f"{upstream_url}/a2a", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
        ],
        "capabilities": {},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": TOOL, "name": TOOL, "description": "Repeat the message.", "tags": ["bench"]}],
    }


def issue_token(config_path: Path, database_url: str, base_url: str) -> str:
    """A JWT for `SUBJECT` with role `bench` from the gateway's built-in issuer.

    Raises:
        RuntimeError: `agentgw token issue` failed.
    """
    args = [sys.executable, "-m", "agentgw", "token", "issue", "--config", str(config_path)]
    args += ["--database-url", database_url, "--subject", SUBJECT.removeprefix("user:"), "--role", "bench"]
    for path in ("/mcp", f"/mcp/{SERVER}", "/v1", "/a2a"):
        args += ["--resource", base_url + path]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"agentgw token issue failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def gateway_args(config_path: Path, port: int, database_url: str, extra: Sequence[str] = ()) -> list[str]:
    args = [sys.executable, "-m", "agentgw", "serve", "--config", str(config_path)]
    return [*args, "--host", "127.0.0.1", "--port", str(port), "--database-url", database_url, *extra]


def floor_args(port: int, upstream_url: str) -> list[str]:
    return [sys.executable, "-m", "bench", "floor", "--port", str(port), "--upstream", upstream_url]


def upstream_args(kind: str, port: int) -> list[str]:
    if kind == "fast":
        return [sys.executable, "-m", "bench", "upstream", "--port", str(port), "--server", "uvicorn"]
    return [sys.executable, "-m", "conformance.fixtures.mcp_upstreams", "modern", "--port", str(port)]


# --- one comparison --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured path at one concurrency."""

    path: str
    concurrency: int
    result: Result
    cpu_ms_per_call: float | None = None  # the gateway's, for gateway rows
    ratio: float | None = None  # throughput / direct throughput
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "result"}
        return out | self.result.summary()


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    kind: str = "mcp"
    era: str = "modern"
    upstream: str = "fast"
    workers: int = 1
    memory: dict[str, float] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "kind": self.kind,
                "era": self.era,
                "upstream": self.upstream,
                "workers": self.workers,
                "stages": self.stages,
                "rows": [r.summary() for r in self.rows],
                "memory": self.memory,
            },
            option=orjson.OPT_INDENT_2,
        )


async def _measure(
    kind: Kind,
    url: str,
    era: Era,
    token: str | None,
    tool: str,
    calls: int,
    concurrency: int,
    gateway_pid: int | None,
    *,
    warmup: bool = False,
) -> tuple[Result, float | None]:
    load = workload(kind, url, era=era, token=token, tool=tool, model=MODEL)
    async with http_client("aiohttp", concurrency, REQUEST_TIMEOUT_S) as http:
        # Setup (a legacy session's initialize) is not part of the measured CPU.
        before = cpu_seconds(gateway_pid) if gateway_pid else 0.0
        result = await run(load, calls, concurrency, http=http, stop_on_error=warmup)
        after = cpu_seconds(gateway_pid) if gateway_pid else 0.0
    cpu = (after - before) * 1000 / max(result.calls, 1) if gateway_pid else None
    return result, cpu


def targets(
    kind: Kind, upstream: str, gateway: str, bridge: bool, floor: str | None = None
) -> list[tuple[str, str, str]]:
    """(row name, URL, tool) of each measured path; `upstream`, `gateway` and `floor` are base URLs."""
    proxies = [("floor", floor)] if floor else []
    proxies.append(("gateway", gateway))
    if kind == "llm":
        return [("direct", f"{upstream}/v1/chat/completions", "")] + [
            (name, f"{base}/v1/chat/completions", "") for name, base in proxies
        ]
    if kind == "a2a":
        return [("direct", f"{upstream}/a2a", "")] + [
            (name, f"{base}/a2a/{SERVER}", "") for name, base in proxies
        ]
    paths = [("direct", f"{upstream}/mcp", TOOL)] + [
        (name, f"{base}/mcp/{SERVER}", TOOL) for name, base in proxies
    ]
    if bridge:
        paths.append(("bridge", f"{gateway}/mcp", f"{SERVER}__{TOOL}"))
    return paths


async def compare(
    upstream_url: str,
    gateway_url: str,
    gateway_pid: int,
    *,
    kind: Kind = "mcp",
    era: Era,
    token: str | None,
    calls: int,
    concurrencies: Sequence[int],
    warmup: int,
    bridge: bool,
    floor: tuple[str, int] | None = None,
    on_row: Callable[[Row], None] = lambda _: None,
) -> list[Row]:
    """Direct, (floor,) pass-through and bridge runs at each concurrency, with ratios to direct.

    Args:
        floor: the bare forwarder's base URL and pid, measured as its own row.

    Raises:
        RuntimeError: a path failed its warm-up (the first error is in the message).
    """
    pids = {"direct": None, "floor": floor[1] if floor else None}
    paths = [
        (name, url, tool, pids.get(name, gateway_pid))
        for name, url, tool in targets(kind, upstream_url, gateway_url, bridge, floor[0] if floor else None)
    ]
    for _, url, tool, pid in paths:
        warm, _ = await _measure(kind, url, era, token, tool, warmup, 10, pid, warmup=True)
        if warm.errors:
            raise RuntimeError(f"warm-up against {url} failed: {warm.first_error}")
    rows: list[Row] = []
    for concurrency in concurrencies:
        direct: Row | None = None
        for name, url, tool, pid in paths:
            result, cpu = await _measure(kind, url, era, token, tool, calls, concurrency, pid)
            row = Row(name, concurrency, result, cpu_ms_per_call=None if cpu is None else round(cpu, 4))
            if direct is None:
                direct = row
            else:
                row.ratio = round(result.calls_per_s / direct.result.calls_per_s, 3)
                row.added_p50_ms = round(result.p50_ms - direct.result.p50_ms, 3)
                row.added_p99_ms = round(result.p99_ms - direct.result.p99_ms, 3)
            rows.append(row)
            on_row(row)
    return rows


async def memory_run(
    kind: Kind, url: str, era: Era, token: str | None, calls: int, pid: int
) -> dict[str, float]:
    """RSS before and after `calls` calls through the gateway at concurrency 10."""
    start = rss_mb(pid)
    result, cpu = await _measure(kind, url, era, token, TOOL, calls, 10, pid)
    return {
        "calls": calls,
        "rss_start_mb": round(start, 1),
        "rss_end_mb": round(rss_mb(pid), 1),
        "errors": result.errors,
        "calls_per_s": result.calls_per_s,
        "cpu_ms_per_call": round(cpu or 0.0, 4),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEAD: Final = (
    f"{'path':<8} {'c':>3} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6} "
    f"{'x direct':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'gw CPU ms/call':>14}"
)


def heading(report: Report) -> str:
    """The lines above the table's rows."""
    title = (
        f"{report.kind}, era {report.era}, upstream {report.upstream}, stages on: {', '.join(report.stages)}"
        f", gateway workers: {report.workers}"
    )
    return "\n".join([title, HEAD, "-" * len(HEAD)])


def row_line(row: Row) -> str:
    """One row of the table (and its first error, if any)."""
    r = row.result
    line = (
        f"{row.path:<8} {row.concurrency:>3} {r.calls_per_s:>9.0f} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
        f"{r.p99_ms:>8.3f} {r.errors:>6} {_fmt(row.ratio, '.2f'):>8} {_fmt(row.added_p50_ms, '+.3f'):>8} "
        f"{_fmt(row.added_p99_ms, '+.3f'):>8} {_fmt(row.cpu_ms_per_call, '.3f'):>14}"
    )
    return f"{line}\n         first error: {r.first_error}" if r.first_error else line


def memory_line(m: dict[str, float]) -> str:
    return (
        f"memory run: {m['calls']:.0f} calls through the gateway at c=10, "
        f"{m['calls_per_s']:.0f} calls/s, errors {m['errors']:.0f}, "
        f"gateway RSS {m['rss_start_mb']:.1f} MiB -> {m['rss_end_mb']:.1f} MiB, "
        f"CPU {m['cpu_ms_per_call']:.3f} ms/call"
    )


def table(report: Report) -> str:
    """The whole report as a fixed-width text table."""
    lines = [heading(report), *(row_line(row) for row in report.rows)]
    if report.memory:
        lines.append(memory_line(report.memory))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=5000, help="calls per path and concurrency")
    parser.add_argument("--concurrency", default="1,10,50", help="comma-separated (default 1,10,50)")
    parser.add_argument(
        "--kind",
        choices=("mcp", "a2a", "llm"),
        default="mcp",
        help="MCP tools/call, A2A SendMessage, LLM chat",
    )
    parser.add_argument("--era", choices=ERAS, default="modern")
    parser.add_argument("--upstream", choices=("fast", "sdk"), default="fast")
    parser.add_argument("--warmup", type=int, default=500, help="calls per path before measuring")
    parser.add_argument("--no-bridge", dest="bridge", action="store_false", help="skip the /mcp rows")
    parser.add_argument("--anonymous", action="store_true", help="no JWT: anonymous callers (identity light)")
    parser.add_argument("--no-budget", dest="budget", action="store_false", help="no budget rule")
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="metrics.enabled false (no counting per call)",
    )
    parser.add_argument(
        "--redis-url", help="shared state in Redis (sessions, budgets): needed for workers > 1"
    )
    parser.add_argument(
        "--flush-s",
        type=float,
        help="budgets.flush_s (the local ledger's save interval; it refuses calls after 5 failed ones)",
    )
    parser.add_argument("--memory-run", type=int, default=0, metavar="N", help="N calls, RSS before/after")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="`agentgw serve --workers N` (more than 1: Redis for shared state)",
    )
    parser.add_argument(
        "--serve-args", default="", help='more `agentgw serve` options, e.g. "--loop asyncio --http h11"'
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare forwarding proxy (bench/floor.py: the same server and client, no pipeline)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--concurrency: comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit("--concurrency: at least one value, each at least 1")
    return values


def _stop_on_sigterm() -> None:
    # `timeout` and CI send SIGTERM: unwind normally so the upstream and gateway are stopped too.
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _wait_for_workers(gateway: FixtureProcess, workers: int, within_s: float = 60.0) -> None:
    """Until every worker serves: the first to listen makes the port accept, the others follow."""
    deadline = time.monotonic() + within_s
    while f"with {workers} workers" not in gateway.output():
        if gateway.process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: the gateway's workers did not start:\n{gateway.output()[-4000:]}")
        time.sleep(0.05)


def main(args: argparse.Namespace) -> int:
    """`python -m bench compare`: start upstream and gateway, measure, print the table as it fills."""
    concurrencies = _concurrencies(args.concurrency)
    if args.calls < 1:
        raise SystemExit("--calls must be at least 1")
    serve_args = shlex.split(args.serve_args)
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.workers > 1:
        serve_args += ["--workers", str(args.workers)]
        # Several workers need shared sessions and budgets (`agentgw serve` refuses otherwise).
        args.redis_url = args.redis_url or "redis://127.0.0.1:6379/0"
    _stop_on_sigterm()
    install_uvloop()
    upstream_port, gateway_port = free_port(), free_ports(args.workers + 1)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    if args.kind != "mcp" and args.upstream != "fast":
        raise SystemExit(f"--kind {args.kind} needs --upstream fast (the SDK fixture speaks MCP only)")
    try:
        setup = gateway_setup(
            upstream_url,
            gateway_port,
            anonymous=args.anonymous,
            budget=args.budget,
            redis_url=args.redis_url,
            kind=args.kind,
            flush_s=args.flush_s,
            metrics=args.metrics,
        )
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    report = Report(
        stages=setup.stages, kind=args.kind, era=args.era, upstream=args.upstream, workers=args.workers
    )
    print(heading(report), flush=True)
    with tempfile.TemporaryDirectory(prefix="agentgw-bench-") as tmp:
        config_path = Path(tmp) / "gateway.yaml"
        if "data_dir" in _settings_fields():
            # The signing key `token issue` makes and the gateway loads: in the run's directory.
            setup.config["data_dir"] = str(Path(tmp) / "state")
        config_path.write_text(yaml.safe_dump(setup.config))
        database_url = f"sqlite:///{Path(tmp) / 'agentgw.db'}"
        if not setup.config.get("allow_anonymous"):
            # Before the gateway starts: the first run creates the signing key file it then loads.
            try:
                setup.token = issue_token(config_path, database_url, f"http://127.0.0.1:{gateway_port}")
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(start_process(upstream_args(args.upstream, upstream_port), upstream_port))
            gw = stack.enter_context(
                start_process(gateway_args(config_path, gateway_port, database_url, serve_args), gateway_port)
            )
            if args.workers > 1:
                _wait_for_workers(gw, args.workers)
            floor = None
            if args.floor:
                floor_port = free_port()
                bare = stack.enter_context(start_process(floor_args(floor_port, upstream_url), floor_port))
                floor = (bare.url, bare.process.pid)
            pid = gw.process.pid
            try:
                report.rows = asyncio.run(
                    compare(
                        upstream_url,
                        gw.url,
                        pid,
                        kind=args.kind,
                        era=args.era,
                        token=setup.token,
                        calls=args.calls,
                        concurrencies=concurrencies,
                        warmup=args.warmup,
                        bridge=args.bridge,
                        floor=floor,
                        on_row=lambda row: print(row_line(row), flush=True),
                    )
                )
            except RuntimeError as exc:
                print(f"error: {exc}\ngateway output:\n{gw.output()[-4000:]}", file=sys.stderr)
                return 1
            if args.memory_run:
                url = targets(args.kind, upstream_url, gw.url, False)[1][1]
                report.memory = asyncio.run(
                    memory_run(args.kind, url, args.era, setup.token, args.memory_run, pid)
                )
                print(memory_line(report.memory), flush=True)
    if args.json:
        args.json.write_bytes(report.to_json())
    failed = any(row.result.errors for row in report.rows) or bool(report.memory and report.memory["errors"])
    return 1 if failed else 0
