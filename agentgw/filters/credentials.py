"""Credentials stage: the upstream gets a credential meant for it, never the caller's token.

Modes per upstream (token exchange, client credentials, static) plug in here; with mode `none`
the upstream gets no Authorization header at all.
"""

from __future__ import annotations

from agentgw.call import Call, Reply
from agentgw.pipeline import CallNext

__all__ = ["Credentials"]


class Credentials:
    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        # Defence in depth: whatever an earlier stage did, the caller's credentials never go upstream.
        call.upstream_authorization = None
        return await call_next(call)
