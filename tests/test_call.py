"""The pipeline's vocabulary: what every call carries from the start."""

from __future__ import annotations

import re

from agentgw.call import Call


def test_every_call_gets_a_request_id_of_its_own() -> None:
    ids = [Call("mcp", "call", "mcp:s/t", "s", "tools/call").request_id for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # as wide as the audit column expects
