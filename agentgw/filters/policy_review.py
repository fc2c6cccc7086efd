"""Policy review without a gateway: lint a set of rules, replay recorded decisions under a candidate
policy. Pure functions over parsed rules and audit records, shared by `agentgw policy` and the console.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentgw.filters.authorize import (
    ACTIONS,
    DEFAULT_DENY,
    CasbinAuthorizer,
    Rule,
    object_match,
    parse_rule,
)

__all__ = [
    "ADMIN_AREAS",
    "OBJECT_ACTIONS",
    "REQUEST_ACTIONS",
    "SUBJECT_PREFIXES",
    "Change",
    "Finding",
    "lint",
    "parse_rules",
    "replay",
]

ADMIN_AREAS = ("registry", "policies", "keys", "budgets", "audit", "metrics")
OBJECT_ACTIONS = {
    "mcp:": {"list", "call", "read"},
    "a2a:": {"list", "send", "call"},
    "llm:": {"list", "call"},
    "admin:": {"read", "write"},
}
SUBJECT_PREFIXES = ("user:", "client:", "role:")
REQUEST_ACTIONS = tuple(a for a in ACTIONS if a != "*")


def parse_rules(text: str, source: str = "candidate") -> list[Rule]:
    """The rules of a policy CSV text (blank lines and `#` comments skipped), each naming its line.

    Raises:
        PolicyError: a line is malformed.
    """
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            rules.append(parse_rule(line, f"{source}:{number}"))
    return rules


# --- lint ---


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    source: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.rule}: {self.problem}"


def _object_problem(obj: str, act: str) -> str | None:
    if obj == "*":
        return None
    body = obj[:-1] if obj.endswith("*") else obj
    if "*" in body:
        return "a `*` before the end is a literal character here, so this object can never match"
    prefix = next((p for p in OBJECT_ACTIONS if obj.startswith(p)), None)
    if prefix is None:
        if not any(p.startswith(body) for p in OBJECT_ACTIONS):
            return "the object starts with no known kind (mcp:, a2a:, llm:, admin:): it can never match"
        return None
    if prefix == "admin:" and not obj.endswith("*") and obj.removeprefix("admin:") not in ADMIN_AREAS:
        return f"unknown admin area: use one of {', '.join(ADMIN_AREAS)}"
    if act != "*" and act not in OBJECT_ACTIONS[prefix]:
        return f"action {act!r} never happens on {prefix} objects"
    return None


def _covers(broad: Rule, narrow: Rule) -> bool:
    b_sub, b_obj, b_act, _ = broad.fields
    n_sub, n_obj, n_act, _ = narrow.fields
    subject = b_sub in ("*", n_sub)
    pattern = b_obj == n_obj or (b_obj.endswith("*") and object_match(n_obj.rstrip("*"), b_obj))
    return subject and pattern and b_act in ("*", n_act)


def lint(rules: Sequence[Rule]) -> list[Finding]:
    """Rules that can never match or never allow, roles that are never granted or grant nothing."""
    findings: list[Finding] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    p_rules = [r for r in rules if r.kind == "p"]
    g_rules = [r for r in rules if r.kind == "g"]
    granted = {r.fields[1] for r in g_rules}
    members = {r.fields[0] for r in g_rules}
    used = {r.fields[0] for r in p_rules}
    for rule in rules:
        key = (rule.kind, rule.fields)
        if key in seen:
            findings.append(Finding(rule.text, rule.source, "duplicate rule"))
        seen.add(key)
    for rule in p_rules:
        sub, obj, act, eft = rule.fields
        if sub not in ("*", "anonymous") and not sub.startswith(SUBJECT_PREFIXES):
            findings.append(
                Finding(rule.text, rule.source, "the subject has no user:, client: or role: prefix")
            )
        if (problem := _object_problem(obj, act)) is not None:
            findings.append(Finding(rule.text, rule.source, problem))
        if act not in ACTIONS:
            findings.append(Finding(rule.text, rule.source, f"unknown action {act!r}"))
        if sub.startswith("role:") and sub not in granted:
            findings.append(
                Finding(
                    rule.text,
                    rule.source,
                    f"{sub} is granted by no g rule (only tokens carrying it reach it)",
                )
            )
        if eft == "allow":
            shadow = next((d for d in p_rules if d.fields[3] == "deny" and _covers(d, rule)), None)
            if shadow is not None:
                findings.append(Finding(rule.text, rule.source, f"can never allow: {shadow.text} denies it"))
    for rule in g_rules:
        role = rule.fields[1]
        if role not in used and role not in members:
            findings.append(Finding(rule.text, rule.source, f"{role} grants nothing: no p rule names it"))
    return findings


# --- replay ---


@dataclass(frozen=True, slots=True)
class Change:
    """A recorded decision the candidate policy decides the other way."""

    record: Mapping[str, Any]
    was: str  # allowed, denied
    now: str
    now_rule: str

    @property
    def widening(self) -> bool:
        return self.now == "allowed"


def _recorded(record: Mapping[str, Any]) -> str | None:
    """What the policy decided for a recorded call: allowed, denied, or None when the policy did not
    decide it (an outcome, a listing, a session message, a refusal before the policy stage)."""
    if record["event"] != "decision" or record["action"] not in REQUEST_ACTIONS or record["action"] == "list":
        return None
    if not record["subject"]:
        return None
    if record["reason"] == "denied_by_policy":
        return "denied"
    # A rule is recorded only once the policy stage decided; a later stage may still have refused.
    return "allowed" if record["rule"] and record["rule"].endswith(", allow") else None


def replay(records: Iterable[Mapping[str, Any]], candidate: CasbinAuthorizer) -> tuple[int, list[Change]]:
    """Decide every recorded policy decision with `candidate`; return how many were decided and the
    ones that come out the other way."""
    replayed = 0
    changes: list[Change] = []
    for record in records:
        was = _recorded(record)
        if was is None:
            continue
        replayed += 1
        decision = candidate.explain(
            record["subject"], record["roles"], record["actors"][:1], record["resource"], record["action"]
        )
        now = "allowed" if decision.allowed else "denied"
        if now != was:
            changes.append(Change(record, was, now, decision.rule or DEFAULT_DENY))
    return replayed, changes
