"""Budget stage: reserve before the upstream is called, settle after. Budgets are not configured yet;
this stage is the seam where they plug in, so its position in the pipeline is already fixed."""

from __future__ import annotations

from agentgw.call import Call, Reply
from agentgw.pipeline import CallNext

__all__ = ["Budget"]


class Budget:
    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        return await call_next(call)
