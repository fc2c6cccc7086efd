"""The policy's object patterns, shared by the policy stage, the budgets and the audit settings.

A budget or an audit setting names the objects it covers with the same patterns as a policy rule
(`mcp:github/*`), so all of them must match alike; the rule lives here, below every room that uses it.
"""

from __future__ import annotations

__all__ = ["object_match"]


def object_match(request_obj: str, pattern: str) -> bool:
    """Exact match, or prefix match when the pattern ends in `*` (the only special character)."""
    if pattern.endswith("*"):
        return request_obj.startswith(pattern[:-1])
    return request_obj == pattern
