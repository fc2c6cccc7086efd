"""What tracing adds to one pipeline run, in process, each way it can be set up.

    python -m bench.tracing_cost                    # 5 rounds of 20,000 runs each way, alternated
    python -m bench.tracing_cost --runs 5000 --rounds 3

Five pass-through stages, the admission hook and a terminal that asks for the upstream's trace
headers as the upstream HTTP client does, run as:

- `plain`: the bare `Pipeline` (no tracing code at all);
- `off`: `tracing.exporter: none` (the default), the caller sending no `traceparent`;
- `off+ctx`: the same, the caller's `traceparent` recorded and passed on;
- `on`: spans made by the OpenTelemetry SDK for every call (sampled) and handed to an exporter that
  drops them (what remains is the SDK's own cost, not a collector's).

Rounds alternate so that a machine shared with other work loads every side alike; the numbers are
this process's CPU time per run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from agentgw.call import Call, Principal, Reply
from agentgw.pipeline import CallNext, Pipeline
from agentgw.tracing import Tracing, TracingSettings, _inbound, outbound_headers, parse_traceparent

__all__ = ["SIDES", "main", "measure"]

PRINCIPAL = Principal("user:bench")
SIDES = ("plain", "off", "off+ctx", "on")
CALLER = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


class _Stage:
    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        return await call_next(call)


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def _admitted(call: Call) -> None:
    return None


async def _terminal(call: Call) -> Reply:
    outbound_headers()  # what the upstream client asks for every request it sends
    return Reply()


def _pipeline(side: str) -> Pipeline:
    pipeline = Pipeline([_Stage() for _ in range(5)], _admitted)
    if side == "plain":
        return pipeline
    exporter = _Drop() if side == "on" else None
    return Tracing(TracingSettings(), exporter).pipeline(pipeline)


async def _round(pipeline: Pipeline, runs: int, with_context: bool) -> float:
    token = _inbound.set(CALLER if with_context else None)
    try:
        # This process's CPU time, not the wall clock: other work on the machine preempts the loop.
        started = time.process_time()
        for _ in range(runs):
            call = Call("mcp", "call", "mcp:bench/echo", "bench", "tools/call", principal=PRINCIPAL)
            await pipeline.run(call, _terminal)
        return (time.process_time() - started) / runs
    finally:
        _inbound.reset(token)


async def measure(runs: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per run of every side, one figure per round."""
    pipelines = {side: _pipeline(side) for side in SIDES}
    for side in SIDES:  # warm up
        await _round(pipelines[side], 500, side in ("off+ctx", "on"))
    out: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            out[side].append(await _round(pipelines[side], runs, side in ("off+ctx", "on")))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=20_000, help="pipeline runs per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds each way, alternated")
    args = parser.parse_args(argv)
    found = asyncio.run(measure(args.runs, args.rounds))
    plain = found["plain"]
    for side in SIDES:
        rounds = ", ".join(f"{s * 1e6:.2f}" for s in found[side])
        added = [(s - p) * 1e6 for p, s in zip(plain, found[side], strict=True)]
        print(
            f"{side:8} {rounds} us/run; added to plain: median {statistics.median(added):.2f} us "
            f"(min {min(added):.2f}, max {max(added):.2f})"
        )


if __name__ == "__main__":
    main()
