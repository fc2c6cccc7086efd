"""The one pipeline every call goes through, whatever its protocol.

The order of the stages is written once, here, with the reason for each position. Ingress adapters
call `Pipeline.run(call, terminal)`, where `terminal` is the upstream dispatch for that call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from agentgw.call import Call, Reply

__all__ = ["Admitted", "CallNext", "Filter", "Pipeline"]

CallNext = Callable[[Call], Awaitable[Reply]]
# Awaited with the call after the last stage admitted it and before the terminal forwards it;
# raising stops the call there (the audit log's fail-closed "decision" record).
Admitted = Callable[[Call], Awaitable[None]]


class Filter(Protocol):
    """A pipeline stage: returns a `Reply` or raises a `GatewayError`; never signals through flags."""

    async def __call__(self, call: Call, call_next: CallNext) -> Reply: ...


class Pipeline:
    """An ordered tuple of filters in front of a per-call terminal stage."""

    def __init__(self, filters: Sequence[Filter], admitted: Admitted | None = None) -> None:
        self.filters = tuple(filters)
        self.admitted = admitted

    async def run(self, call: Call, terminal: CallNext) -> Reply:
        """Run `call` through every filter, then `terminal`.

        Raises:
            GatewayError: a stage refused the call, or the upstream failed.
        """
        filters = self.filters
        last = len(filters)
        admitted = self.admitted

        async def step(index: int, current: Call) -> Reply:
            if index == last:
                if admitted is not None:
                    await admitted(current)
                return await terminal(current)
            return await filters[index](current, lambda c: step(index + 1, c))

        return await step(0, call)


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
