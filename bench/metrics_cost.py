"""What metrics add to one pipeline run, in process: the same pipeline with and without its observer.

    python -m bench.metrics_cost                    # 5 rounds of 50,000 runs each way, alternated
    python -m bench.metrics_cost --runs 20000 --rounds 3

The stages pass the call on and do nothing else, so what is left between the two is the runner's
timing and `Metrics.finished` (the call counter, the stage and upstream histograms, the label lookup).
Rounds alternate so that a machine shared with other work loads both sides alike; the numbers are
this process's CPU time per run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from agentgw.call import Call, Principal, Reply
from agentgw.metrics import Metrics
from agentgw.pipeline import CallNext, Pipeline

__all__ = ["main", "measure"]

PRINCIPAL = Principal("user:bench")


class _Stage:
    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        return await call_next(call)


async def _admitted(call: Call) -> None:
    return None


async def _terminal(call: Call) -> Reply:
    return Reply()


def _pipeline(metrics: bool) -> Pipeline:
    pipeline = Pipeline([_Stage() for _ in range(5)], _admitted)
    if metrics:
        pipeline.observer = Metrics(pipeline.stages, known=lambda _protocol, name: name == "bench")
    return pipeline


async def _round(pipeline: Pipeline, runs: int) -> float:
    # This process's CPU time, not the wall clock: other work on the machine preempts the loop.
    started = time.process_time()
    for _ in range(runs):
        call = Call("mcp", "call", "mcp:bench/echo", "bench", "tools/call", principal=PRINCIPAL)
        await pipeline.run(call, _terminal)
    return (time.process_time() - started) / runs


async def measure(runs: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per run without and with metrics, one figure per round."""
    off, on = _pipeline(False), _pipeline(True)
    await _round(off, 1000)  # warm up both
    await _round(on, 1000)
    without: list[float] = []
    with_metrics: list[float] = []
    for _ in range(rounds):
        without.append(await _round(off, runs))
        with_metrics.append(await _round(on, runs))
    return without, with_metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=50_000, help="pipeline runs per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds each way, alternated")
    args = parser.parse_args(argv)
    without, with_metrics = asyncio.run(measure(args.runs, args.rounds))
    added = [(w - o) * 1e6 for o, w in zip(without, with_metrics, strict=True)]
    print(f"without metrics: {', '.join(f'{s * 1e6:.2f}' for s in without)} us/run")
    print(f"with metrics:    {', '.join(f'{s * 1e6:.2f}' for s in with_metrics)} us/run")
    print(
        f"added per run:   median {statistics.median(added):.2f} us "
        f"(min {min(added):.2f}, max {max(added):.2f}) over {args.rounds} rounds of {args.runs}"
    )


if __name__ == "__main__":
    main()
