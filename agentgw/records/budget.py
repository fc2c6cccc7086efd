"""Budgets as records: the rules, the settings, the counters a call is charged on, and how to plan them.

The budget stage, the counter stores, the rule book, the admin API and the CLI all read these, so
they sit below every one of them (a store must not import the stage it serves). Planning is pure:
`plan` says which counters a call must reserve and how much; the stage asks a store to take them
all or none, and a store checks each with `admits`.

A budget is a `BudgetRule`: a limit on calls, tokens and/or cost, counted per agent run or per
principal (subject, role or client) within a window (minute, hour, day, month); rate limits are
budgets with a `calls` limit. A run is counted per principal in it (its subject), unless the rule
says `shared_run`: a run id is no secret, and another caller must not be able to exhaust it.

The run a call belongs to is `Call.run_id` (the `Agent-Run-Id` header or the `io.agentgw/runId`
`_meta` key), falling back to `Call.session_id`; a call with neither is in no run, and run budgets do
not apply to it. Only spending actions (`call`, `read`, `send`) spend; discovery and session
messages pass free.
"""

from __future__ import annotations

import calendar
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal, Self
from urllib.parse import quote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from agentgw.call import Call, Principal
from agentgw.records.policy import object_match

__all__ = [
    "BUDGET_NAME",
    "COST_SCALE",
    "SPENDING_ACTIONS",
    "BudgetRule",
    "BudgetSettings",
    "Charge",
    "Metric",
    "Per",
    "Shortfall",
    "Target",
    "Window",
    "admits",
    "plan",
    "run_key",
    "targets",
    "window_bounds",
]

Window = Literal["minute", "hour", "day", "month"]
Per = Literal["run", "subject", "role", "client"]
Metric = Literal["calls", "tokens", "cost"]

SPENDING_ACTIONS = frozenset({"call", "read", "send"})
# Cost is counted in millionths so that counters are integers: atomic arithmetic on floats drifts.
COST_SCALE = 1_000_000
_FIXED_WINDOWS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}


BUDGET_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


def _whole(value: object) -> object:
    # JSON Schema counts 5.0 as an integer; strict validation alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[int, Field(ge=0), BeforeValidator(_whole)]
# What `BudgetRule._consistent` checks, for the OpenAPI document: clients see the rules of a budget
# instead of finding them out from a 422.
CONSISTENT: JsonDict = {
    "allOf": [
        {"properties": {"name": {"not": {"const": "effective"}}}},
        {
            "anyOf": [
                {"properties": {metric: {"not": {"type": "null"}}}, "required": [metric]}
                for metric in ("calls", "tokens", "cost", "duration_s")
            ]
        },
        {
            "anyOf": [
                {"properties": {"per": {"const": "run"}}},
                {
                    "properties": {"window": {"type": "string"}, "duration_s": {"type": "null"}},
                    "required": ["window"],
                },
            ]
        },
        # shared_run only on a run budget.
        {
            "anyOf": [
                {"properties": {"per": {"const": "run"}}},
                {"properties": {"shared_run": {"const": False}}},
            ]
        },
    ]
}


class BudgetRule(BaseModel):
    """One budget: limits on calls, tokens and cost, per run or per principal, per window.

    Attributes:
        name: unique; names the budget in errors, audit records and the admin API.
        per: what is counted separately: each `run`, each `subject`, each `role`, each `client`.
        match: which runs/subjects/roles/clients the budget applies to (exact, or a trailing `*`).
        window: the counting window; required for principal budgets, optional for runs (a run
            budget without one lasts the run).
        shared_run: for runs only: every principal in a run spends from one count. By default each
            principal's calls in a run are counted apart, so that a caller who knows (or guesses)
            another's run id cannot exhaust that run; a run that spans agents with one budget says
            so here.
        resource: the policy objects it covers (`mcp:github/*`, `llm:gpt-4o`); `*` for all.
        per_resource: count each tool/model separately ("at most 5 calls per tool").
        calls, tokens, cost: the limits (at least one, or `duration_s`).
        duration_s: for runs only: no call is admitted this long after the run's first call.
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=CONSISTENT)

    name: str = Field(pattern=BUDGET_NAME)
    per: Per = "run"
    match: str = "*"
    window: Window | None = None
    shared_run: bool = False
    resource: str = "*"
    per_resource: bool = False
    calls: Count | None = None
    tokens: Count | None = None
    cost: float | None = Field(default=None, ge=0)
    duration_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.name == "effective":
            raise ValueError("'effective' is reserved (GET /admin/budgets/effective): choose another name")
        if self.calls is None and self.tokens is None and self.cost is None and self.duration_s is None:
            raise ValueError(f"budget {self.name!r} sets no limit: give calls, tokens, cost or duration_s")
        if self.per != "run" and self.window is None:
            raise ValueError(f"budget {self.name!r} counts per {self.per}: it needs a window")
        if self.per != "run" and self.duration_s is not None:
            raise ValueError(f"budget {self.name!r}: duration_s applies to run budgets only")
        if self.per != "run" and self.shared_run:
            raise ValueError(f"budget {self.name!r}: shared_run applies to run budgets only")
        return self

    def limits(self) -> list[tuple[Metric, int]]:
        """The counted limits, cost in millionths."""
        out: list[tuple[Metric, int]] = []
        if self.calls is not None:
            out.append(("calls", self.calls))
        if self.tokens is not None:
            out.append(("tokens", self.tokens))
        if self.cost is not None:
            out.append(("cost", round(self.cost * COST_SCALE)))
        return out


class BudgetSettings(BaseModel):
    """The `budgets:` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    # Where counters live: `local` (this process's memory, written behind to the gateway's database;
    # one gateway process per database), `sql` (every reservation a transaction in the gateway's
    # database; many processes) or `redis` (shared by many nodes).
    store: Literal["local", "sql", "redis"] = "local"
    # `local` only: dirty counters are written to the database this often (what a crash loses of them
    # is recounted from the audit log at the next start); a ledger whose saving fails for 5 intervals
    # refuses calls.
    flush_s: float = Field(default=1.0, gt=0)
    # Unset: the gateway's top-level `redis_url`.
    redis_url: str | None = None
    redis_prefix: str = "agentgw:budget:"
    # A run's counters are dropped this long after its first call.
    run_ttl_s: float = Field(default=7 * 86400, gt=0)
    rules: list[BudgetRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("budget names must be unique")
        return self


@dataclass(frozen=True, slots=True)
class Target:
    """One counted thing a rule applies to: `per=value` within the current window."""

    rule: BudgetRule
    value: str  # the run id, subject, role or client id
    start: float  # window start (epoch seconds); for a windowless run budget, 0
    resets_at: float | None  # window end; None: the budget does not reset (start a new run)
    resource: str | None  # set when the rule counts per resource
    owner: str | None = None  # a run counted per principal: the subject whose calls these are

    def key(self, metric: str) -> str:
        """The counter's identity; values are percent-encoded so no value can forge another key."""
        window = int(self.start) if self.rule.window else None
        return _counter_key(
            self.rule.name, self.rule.per, self.value, window, self.resource, metric, self.owner
        )


# Every call of a principal within a window asks for the same keys: encode each once, not with
# three `quote`s per counter on every call.
@functools.lru_cache(maxsize=4096)
def _counter_key(
    name: str, per: str, value: str, window: int | None, resource: str | None, metric: str, owner: str | None
) -> str:
    # An owned run is `<owner>/<run>`: an encoded value holds no `/`, so it differs from any shared run.
    counted = quote(value, safe="") if owner is None else f"{quote(owner, safe='')}/{quote(value, safe='')}"
    parts = [quote(name, safe=""), per, counted, "run" if window is None else str(window)]
    if resource is not None:
        parts.append(quote(resource, safe=""))
    parts.append(metric)
    return "|".join(parts)


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount to reserve on one counter, refused if it would pass `limit`."""

    key: str
    amount: int
    limit: int
    expires_at: float  # the counter may be dropped after this (epoch seconds)
    target: Target
    metric: Metric


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a reservation was refused: `charges[index]` did not fit; the counter stood at `used`."""

    index: int
    used: int


def run_key(call: Call) -> str | None:
    """The run a call is counted under: its run id, else its session, else none."""
    return call.run_id or call.session_id or None


def window_bounds(window: Window, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds, UTC) of the calendar window containing `now`."""
    if window in _FIXED_WINDOWS:
        size = _FIXED_WINDOWS[window]
        start = math.floor(now / size) * size
        return float(start), float(start + size)
    moment = datetime.fromtimestamp(now, UTC)
    start_dt = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end_dt = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return float(calendar.timegm(start_dt.timetuple())), float(calendar.timegm(end_dt.timetuple()))


def _values(rule: BudgetRule, principal: Principal | None, run: str | None) -> list[str]:
    if rule.per == "run":
        candidates = [run] if run else []
    elif principal is None:
        candidates = []
    elif rule.per == "subject":
        candidates = [principal.subject]
    elif rule.per == "role":
        candidates = list(principal.roles)
    else:
        candidates = [principal.client_id] if principal.client_id else []
    return [v for v in candidates if object_match(v, rule.match)]


def targets(
    rules: Sequence[BudgetRule],
    principal: Principal | None,
    run: str | None,
    resource: str | None,
    now: float,
) -> list[Target]:
    """Every counter that a call by `principal` in `run` on `resource` falls under, at time `now`.

    With `resource=None` (the `budget show` view) the resource filter is not applied.
    """
    out: list[Target] = []
    for rule in rules:
        if resource is not None and not object_match(resource, rule.resource):
            continue
        if rule.window is not None:
            start, end = window_bounds(rule.window, now)
            resets_at: float | None = end
        else:
            start, resets_at = 0.0, None
        counted = resource if rule.per_resource and resource is not None else None
        owner = None
        if rule.per == "run" and not rule.shared_run:
            owner = principal.subject if principal is not None else ""
        out.extend(
            Target(rule, value, start, resets_at, counted, owner) for value in _values(rule, principal, run)
        )
    return out


def plan(rules: Sequence[BudgetRule], call: Call, now: float, run_ttl_s: float) -> list[Charge]:
    """What `call` must reserve: one charge per (budget, counted thing, limited metric).

    Tokens and cost are reserved at the call's estimate and trued up after the reply.
    """
    if call.action not in SPENDING_ACTIONS:
        return []
    estimate = call.estimate
    amounts: dict[Metric, int] = {
        "calls": 1,
        "tokens": max(estimate.tokens, 0),
        "cost": max(round(estimate.cost * COST_SCALE), 0),
    }
    charges: list[Charge] = []
    for target in targets(rules, call.principal, run_key(call), call.resource, now):
        expires_at = target.resets_at if target.resets_at is not None else now + run_ttl_s
        for metric, limit in target.rule.limits():
            charges.append(Charge(target.key(metric), amounts[metric], limit, expires_at, target, metric))
    return charges


def admits(used: int, amount: int, limit: int) -> bool:
    """Whether `amount` more fits: within the limit, and nothing fits an exhausted counter.

    The second clause matters for zero estimates (a call that will report tokens only afterwards).
    """
    return used + amount <= limit and used < limit
