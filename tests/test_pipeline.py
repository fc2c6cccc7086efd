"""The pipeline: stages in order, then the admission hook, then each run's own terminal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence

import pytest

from agentgw.call import Call, Reply, current_call
from agentgw.errors import Forbidden, UpstreamUnauthorized
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


class Observed:
    def __init__(self) -> None:
        self.seen: list[tuple[Call, list[float], Reply | BaseException]] = []

    def finished(self, call: Call, spent: Sequence[float], outcome: Reply | BaseException) -> None:
        self.seen.append((call, list(spent), outcome))


class Sleeps:
    """A stage that spends `seconds` of its own before passing the call on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        time.sleep(self.seconds)  # the stage's own work, on the loop as a real stage's would be
        return await call_next(call)


async def test_an_observer_is_told_what_each_stage_took_itself() -> None:
    observer = Observed()

    async def admitted(call: Call) -> None:
        time.sleep(0.01)

    async def terminal(call: Call) -> Reply:
        time.sleep(0.06)
        return Reply(payload="done")

    pipeline = Pipeline([Sleeps(0.04), Sleeps(0.02)], admitted, observer)
    assert pipeline.stages == ("sleeps", "sleeps", "admitted", "upstream")
    reply = await pipeline.run(a_call(), terminal)
    [(_, spent, outcome)] = observer.seen
    assert outcome is reply
    own = [spent[i] - spent[i + 1] for i in range(3)] + [spent[3]]
    # Each within its own time and some slack, well under what it would be with the later stages in it.
    for took, expected in zip(own, [0.04, 0.02, 0.01, 0.06], strict=True):
        assert expected <= took < expected + 0.04


async def test_an_observer_is_told_of_a_refusal_and_which_stages_it_never_reached() -> None:
    observer = Observed()

    async def refuses(call: Call, call_next: CallNext) -> Reply:
        raise Forbidden("no")

    async def terminal(call: Call) -> Reply:
        raise AssertionError("not reached")

    pipeline = Pipeline([Sleeps(0), refuses, Sleeps(0)], None, observer)
    with pytest.raises(Forbidden):
        await pipeline.run(a_call(), terminal)
    [(_, spent, outcome)] = observer.seen
    assert isinstance(outcome, Forbidden)
    assert spent[0] > 0 and spent[1] > 0
    assert spent[2:] == [0.0, 0.0, 0.0]


async def test_a_stage_that_forwards_twice_is_timed_for_both_attempts() -> None:
    observer = Observed()

    async def retries(call: Call, call_next: CallNext) -> Reply:
        with contextlib.suppress(UpstreamUnauthorized):
            await call_next(call)
        return await call_next(call)

    attempts = 0

    async def terminal(call: Call) -> Reply:
        nonlocal attempts
        attempts += 1
        time.sleep(0.02)
        if attempts == 1:
            raise UpstreamUnauthorized("refused")
        return Reply()

    await Pipeline([retries], None, observer).run(a_call(), terminal)
    [(_, spent, _)] = observer.seen
    assert spent[2] >= 0.04  # the terminal, both times
    assert 0 <= spent[0] - spent[1] < 0.02  # the stage itself did next to nothing


async def test_a_broken_observer_does_not_fail_the_call() -> None:
    class Broken:
        def finished(self, call: Call, spent: Sequence[float], outcome: Reply | BaseException) -> None:
            raise RuntimeError("bug")

    async def terminal(call: Call) -> Reply:
        return Reply(payload="done")

    assert (await Pipeline([], None, Broken()).run(a_call(), terminal)).payload == "done"


async def test_the_running_call_is_current_while_the_pipeline_runs_it_and_not_after() -> None:
    seen: list[Call | None] = []

    async def terminal(call: Call) -> Reply:
        seen.append(current_call.get())
        return Reply()

    call = a_call()
    for observer in (None, Observed()):
        await Pipeline([Recorder("a", [])], None, observer).run(call, terminal)
    assert seen == [call, call]
    assert current_call.get() is None
