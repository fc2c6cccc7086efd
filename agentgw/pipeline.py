"""The one pipeline every call goes through, whatever its protocol.

The order of the stages is written once, here, with the reason for each position. Ingress adapters
call `Pipeline.run(call, terminal)`, where `terminal` is the upstream dispatch for that call. While it
runs, `current_call` names the call (for the log lines written meanwhile); with an `Observer`, the
runner also times every stage and tells the observer how the call ended, so that no stage times itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from agentgw.call import Call, Reply, current_call

__all__ = ["Admitted", "CallNext", "Filter", "Observer", "Pipeline"]

log = logging.getLogger(__name__)

CallNext = Callable[[Call], Awaitable[Reply]]
# Awaited with the call after the last stage admitted it and before the terminal forwards it;
# raising stops the call there (the audit log's fail-closed "decision" record).
Admitted = Callable[[Call], Awaitable[None]]


class Filter(Protocol):
    """A pipeline stage: returns a `Reply` or raises a `GatewayError`; never signals through flags."""

    async def __call__(self, call: Call, call_next: CallNext) -> Reply: ...


class Observer(Protocol):
    """Told of every call the pipeline finished (metrics)."""

    def finished(self, call: Call, spent: Sequence[float], outcome: Reply | BaseException) -> None:
        """`call` ended with `outcome`; `spent[i]` is the seconds spent in `Pipeline.stages[i]` and the
        stages after it (so a stage's own time is `spent[i] - spent[i + 1]`), 0.0 if it was not reached;
        the last is the terminal's."""
        ...


def _stage_name(stage: object) -> str:
    # A filter object is named by its class (`Budget` -> `budget`), a function by its own name.
    name = getattr(stage, "__name__", None)
    return (name if isinstance(name, str) else type(stage).__name__).lower()


class Pipeline:
    """An ordered tuple of filters in front of a per-call terminal stage."""

    def __init__(
        self, filters: Sequence[Filter], admitted: Admitted | None = None, observer: Observer | None = None
    ) -> None:
        self.filters = tuple(filters)
        self.admitted = admitted
        self.observer = observer
        # What an observer's `spent` is indexed by: each filter, the admission hook, the terminal.
        self.stages = (*(_stage_name(f) for f in self.filters), "admitted", "upstream")

    async def run(self, call: Call, terminal: CallNext) -> Reply:
        """Run `call` through every filter, then `terminal`.

        Raises:
            GatewayError: a stage refused the call, or the upstream failed.
        """
        filters = self.filters
        last = len(filters)
        admitted = self.admitted
        observer = self.observer
        named = current_call.set(call)
        if observer is None:

            async def step(index: int, current: Call) -> Reply:
                if index == last:
                    if admitted is not None:
                        await admitted(current)
                    return await terminal(current)
                return await filters[index](current, lambda c: step(index + 1, c))

            try:
                return await step(0, call)
            finally:
                current_call.reset(named)

        clock = time.perf_counter
        spent = [0.0] * (last + 2)

        # Each step adds the time inside it, inner steps included: a stage that calls the next twice
        # (a retry) is counted once for each, and nothing is counted twice by subtracting.
        async def timed(index: int, current: Call) -> Reply:
            started = clock()
            try:
                if index < last:
                    return await filters[index](current, lambda c: timed(index + 1, c))
                if admitted is not None:
                    await admitted(current)
                forwarded = clock()
                try:
                    return await terminal(current)
                finally:
                    spent[last + 1] += clock() - forwarded
            finally:
                spent[index] += clock() - started

        outcome: Reply | BaseException
        try:
            outcome = await timed(0, call)
        except BaseException as exc:
            outcome = exc
            raise
        else:
            return outcome
        finally:
            current_call.reset(named)
            # Counting is not a control: a broken observer must not turn an answered call into an error.
            try:
                observer.finished(call, spent, outcome)
            except Exception:
                log.exception("pipeline observer failed for request %s", call.request_id)


def ordered(
    audit: Filter,
    authenticate: Filter,
    authorize: Filter,
    budget: Filter,
    credentials: Filter,
    admitted: Admitted | None = None,
) -> Pipeline:
    """THE order of the stages. Keyword-only construction elsewhere would hide it; keep it here.

    `admitted` (the audit stage's `Audit.admitted`) runs after every stage said yes and before the
    terminal: only there is the decision known and the call not yet forwarded.
    """
    return Pipeline(
        (
            audit,  # outermost: sees every outcome, rejections and crashes included
            authenticate,  # who is calling; everything after needs the principal
            authorize,  # default deny; also narrows discovery listings on the way back
            budget,  # after authorize: a denied call spends nothing
            credentials,  # last: only admitted, funded calls get upstream credentials
        ),
        admitted,  # then the durable "allowed" audit record: no record, no forwarding
    )  # then the ingress's terminal: the upstream client for the call's protocol
