"""Policy stage: Casbin decides whether a principal may do an action on an object; default deny.

pycasbin ships no type hints, so it appears only in this module, behind the `Authorizer` protocol.
Discovery uses the same decision as invocation: a listed item is kept only if `list` is allowed.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import casbin

from agentgw.call import Call, Principal, Reply
from agentgw.errors import Forbidden, GatewayError
from agentgw.pipeline import CallNext

__all__ = ["Authorize", "Authorizer", "CasbinAuthorizer", "Decision", "PolicyError", "object_match"]

log = logging.getLogger(__name__)


class PolicyError(GatewayError):
    """The policy cannot be loaded (unreadable, malformed, or empty when that is not allowed)."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None  # the rule that decided, e.g. "p, role:dev, mcp:github/*, call, allow"


class Authorizer(Protocol):
    def decide(self, principal: Principal, obj: str, act: str) -> Decision: ...


def object_match(request_obj: str, pattern: str) -> bool:
    """Exact match, or prefix match when the pattern ends in `*` (the only special character)."""
    if pattern.endswith("*"):
        return request_obj.startswith(pattern[:-1])
    return request_obj == pattern


class CasbinAuthorizer:
    """Casbin enforcer over a model file, a policy CSV file and inline rules, with a decision cache.

    The cache is dropped whenever the policy changes; decisions are pure given the policy.
    """

    def __init__(
        self, model: Path, policy_file: Path | None, rules: list[str], *, allow_empty: bool = False
    ) -> None:
        self._model = model
        self._policy_file = policy_file
        self._rules = rules
        self._allow_empty = allow_empty
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, tuple[str, ...], str, str], Decision] = {}
        self._enforcer, self._explainer = self._load()

    def _load(self) -> tuple[Any, Any]:
        try:
            text = self._model.read_text()
            # Casbin explains a denial but not an allow under "allow and no deny"; a twin enforcer
            # with an allow-only effect names the allowing rule for audit records.
            explain_text = re.sub(r"(?m)^e\s*=.*$", "e = some(where (p.eft == allow))", text)
            enforcers = []
            for model_text in (text, explain_text):
                model = casbin.model.Model()
                model.load_model_from_text(model_text)
                enforcer = casbin.Enforcer(model)
                enforcer.add_function("objectMatch", object_match)
                enforcers.append(enforcer)
            for line in self._lines():
                kind, *fields = [f.strip() for f in line.split(",")]
                if kind == "p":
                    if len(fields) == 3:
                        fields.append("allow")
                    if len(fields) != 4 or fields[3] not in ("allow", "deny"):
                        raise PolicyError(f"bad policy rule {line!r}: want p, sub, obj, act[, allow|deny]")
                    for enforcer in enforcers:
                        enforcer.add_policy(*fields)
                elif kind == "g":
                    if len(fields) != 2:
                        raise PolicyError(f"bad role rule {line!r}: want g, member, role")
                    for enforcer in enforcers:
                        enforcer.add_grouping_policy(*fields)
                else:
                    raise PolicyError(f"bad policy line {line!r}: it must start with p or g")
        except PolicyError:
            raise
        except Exception as exc:  # casbin raises bare exceptions for unreadable models
            raise PolicyError(f"cannot load policy: {exc}") from exc
        if not enforcers[0].get_policy() and not self._allow_empty:
            raise PolicyError("the policy is empty: every call would be denied (set policy.allow_empty)")
        return enforcers[0], enforcers[1]

    def _lines(self) -> list[str]:
        text = self._policy_file.read_text() if self._policy_file else ""
        lines = [*text.splitlines(), *self._rules]
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]

    def reload(self) -> None:
        """Load the policy again; on failure keep the last good one.

        Raises:
            PolicyError: the new policy is broken (the old one stays in force).
        """
        enforcers = self._load()
        with self._lock:
            self._enforcer, self._explainer = enforcers
            self._cache = {}

    def decide(self, principal: Principal, obj: str, act: str) -> Decision:
        key = (principal.subject, principal.roles, obj, act)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self._decide(principal, obj, act)
        self._cache[key] = decision
        return decision

    def _decide(self, principal: Principal, obj: str, act: str) -> Decision:
        allowed_as: str | None = None
        # Roles from the token are identities too; an explicit deny reached from any of them wins.
        for subject in (principal.subject, *principal.roles):
            allowed, explain = self._enforcer.enforce_ex(subject, obj, act)
            if not allowed and explain:
                return Decision(False, "p, " + ", ".join(explain))
            if allowed and allowed_as is None:
                allowed_as = subject
        if allowed_as is None:
            return Decision(False, None)
        _, explain = self._explainer.enforce_ex(allowed_as, obj, act)
        return Decision(True, "p, " + ", ".join(explain) if explain else None)


class Authorize:
    """Refuses calls the policy does not allow; narrows discovery listings to what is allowed."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        principal = call.principal
        if principal is None:  # a pipeline built without the identity stage: refuse, never pass
            raise Forbidden("denied by policy: no principal")
        if call.action == "session":
            return await call_next(call)
        if call.action == "list":
            reply = await call_next(call)
            if reply.listing is not None:
                decide = self._authorizer.decide
                reply.listing = [o for o in reply.listing if decide(principal, o, "list").allowed]
            return reply
        decision = self._authorizer.decide(principal, call.resource, call.action)
        call.decided_by = decision.rule
        if not decision.allowed:
            # The same words whether or not the object exists: a denial must not reveal a tool.
            raise Forbidden(f"denied by policy: {principal.subject} may not {call.action} this object")
        return await call_next(call)
