"""The pipeline: stages in order, then the admission hook, then each run's own terminal."""

from __future__ import annotations

import asyncio
import dataclasses

from agentgw.call import Call, Reply
from agentgw.pipeline import CallNext, Pipeline


def a_call() -> Call:
    return Call("mcp", "call", "mcp:s/t", "s", "tools/call")


class Recorder:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        self.seen.append(self.name)
        await asyncio.sleep(0)  # let concurrent runs interleave
        return await call_next(call)


async def test_stages_run_in_order_then_admitted_then_the_terminal() -> None:
    seen: list[str] = []

    async def admitted(call: Call) -> None:
        seen.append("admitted")

    async def terminal(call: Call) -> Reply:
        seen.append("terminal")
        return Reply(payload="done")

    pipeline = Pipeline([Recorder("a", seen), Recorder("b", seen)], admitted)
    assert (await pipeline.run(a_call(), terminal)).payload == "done"
    assert seen == ["a", "b", "admitted", "terminal"]


async def test_concurrent_runs_of_one_pipeline_each_reach_their_own_terminal() -> None:
    pipeline = Pipeline([Recorder("a", []), Recorder("b", [])])

    def answering(n: int) -> CallNext:
        async def terminal(call: Call) -> Reply:
            return Reply(payload=n)

        return terminal

    replies = await asyncio.gather(*(pipeline.run(a_call(), answering(n)) for n in range(20)))
    assert [r.payload for r in replies] == list(range(20))


async def test_a_stage_may_pass_on_another_call_and_the_rest_see_that_one() -> None:
    seen: list[str] = []

    async def narrows(call: Call, call_next: CallNext) -> Reply:
        return await call_next(dataclasses.replace(call, resource="mcp:s/narrowed"))

    async def admitted(call: Call) -> None:
        seen.append(f"admitted {call.resource}")

    async def terminal(call: Call) -> Reply:
        return Reply(payload=call.resource)

    assert (await Pipeline([narrows], admitted).run(a_call(), terminal)).payload == "mcp:s/narrowed"
    assert seen == ["admitted mcp:s/narrowed"]
