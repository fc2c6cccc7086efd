"""Tasks: which tasks an agent's answer names, whether it ends the exchange, and who owns each task.

The gateway keeps task ownership: a task the agent creates for a caller belongs to that caller's
subject, and any other caller's reference to it reads as `TaskNotFound`, exactly as for a task that
does not exist. Context ids are not owned: agents pass them along a chain of calls on purpose (that
is what per-context budgets count).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

from agentgw.ingress.a2a.messages import spellings, strings

__all__ = ["MemoryTaskOwners", "TaskOwners", "answer_task_ids", "is_final"]


_FINAL_STATES = frozenset(
    {
        "TASK_STATE_COMPLETED",
        "TASK_STATE_FAILED",
        "TASK_STATE_CANCELED",
        "TASK_STATE_CANCELLED",  # the 0.3 protobuf spelling
        "TASK_STATE_REJECTED",
        "TASK_STATE_INPUT_REQUIRED",
        "TASK_STATE_AUTH_REQUIRED",
        "completed",
        "failed",
        "canceled",
        "rejected",
        "input-required",
        "auth-required",
    }
)
# An answer's wrappers, in every spelling an agent may use: 1.0 and 0.3 protobuf JSON (camelCase, or
# field names), `msg` being the 0.3 field behind the JSON name `message`.
_WRAPPERS = {
    "task": ("task",),
    "message": ("message", "msg"),
    "statusUpdate": ("statusUpdate", "status_update"),
    "artifactUpdate": ("artifactUpdate", "artifact_update"),
}


def _wrapped(result: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    found = [result.get(key) for key in _WRAPPERS[kind]]
    return [f for f in found if isinstance(f, Mapping)]


def _state(obj: Any) -> Any:
    status = obj.get("status") if isinstance(obj, Mapping) else None
    return status.get("state") if isinstance(status, Mapping) else None


def answer_task_ids(result: Any) -> list[str]:
    """The task ids an answer or stream event names (1.0/0.3 `task`/`message`/`statusUpdate`/
    `artifactUpdate` wrappers, or a 0.3 JSON-RPC object with `kind`)."""
    if not isinstance(result, Mapping):
        return []
    found: list[Any] = [t.get("id") for t in _wrapped(result, "task")]
    for wrapper in ("message", "statusUpdate", "artifactUpdate"):
        for inner in _wrapped(result, wrapper):
            found += spellings(inner, "taskId")
    kind = result.get("kind")
    if kind == "task":
        found.append(result.get("id"))
    elif kind in ("message", "status-update", "artifact-update"):
        found += spellings(result, "taskId")
    return list(dict.fromkeys(strings(found)))


def is_final(result: Any) -> bool:
    """Whether a stream event ends the exchange: a message, or a task in a final or interrupted state."""
    if not isinstance(result, Mapping):
        return False
    kind = result.get("kind")
    if _wrapped(result, "message") or kind == "message":
        return True
    updates = _wrapped(result, "statusUpdate")
    if result.get("final") is True or any(u.get("final") is True for u in updates):
        return True
    candidates = [*_wrapped(result, "task"), *updates, result if kind else None]
    return any(_state(c) in _FINAL_STATES for c in candidates)


# --- task ownership --------------------------------------------------------------------------------


class TaskOwners(Protocol):
    """Who created each task (by principal subject), per agent."""

    async def claim(self, agent: str, task_id: str, subject: str) -> bool:
        """Record `subject` as the owner unless someone else is; True if `subject` owns it now."""
        ...

    async def owner(self, agent: str, task_id: str) -> str | None: ...


class MemoryTaskOwners:
    """In-memory ownership of one gateway process; the oldest entries go first beyond `capacity`.

    A forgotten task (evicted, or created before a restart) is no one's: it reads as not found.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._owners: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._capacity = capacity

    async def claim(self, agent: str, task_id: str, subject: str) -> bool:
        key = (agent, task_id)
        current = self._owners.get(key)
        if current is None:
            self._owners[key] = subject
            if len(self._owners) > self._capacity:
                self._owners.popitem(last=False)
            return True
        self._owners.move_to_end(key)
        return current == subject

    async def owner(self, agent: str, task_id: str) -> str | None:
        return self._owners.get((agent, task_id))
