"""Budget stage: reserve from every budget a call falls under before it is forwarded, settle after.

What a call must reserve is planned from the rules in `agentgw.records.budget` (`plan`, pure); the
counters live behind the `BudgetStore` protocol, declared here because this stage is what calls it.
The stores in `agentgw.storage.budget` implement it (`LocalBudgetStore`, this process's memory
written behind to SQL; `SqlBudgetStore`; `RedisBudgetStore`); their `reserve` is all-or-nothing and
atomic (across processes for SQL and Redis; a local ledger has one process).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import anyio

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import BudgetExceeded, GatewayError
from agentgw.pipeline import CallNext
from agentgw.records.budget import (
    COST_SCALE,
    SPENDING_ACTIONS,
    BudgetRule,
    Charge,
    Shortfall,
    Target,
    plan,
    run_key,
    targets,
)

__all__ = [
    "Budget",
    "BudgetStore",
    "PlanCache",
    "RuleSource",
    "StaticRules",
    "effective_budgets",
    "exhausted",
]

log = logging.getLogger(__name__)


class BudgetStore(Protocol):
    """Counters. `reserve` is atomic: all charges are taken, or none (then the first that did not fit).

    Every charge is checked with the rule of `admits`. `now` is the caller's clock (injectable in
    tests): a counter whose `expires_at` is not after `now` counts as absent.
    """

    async def reserve(self, charges: Sequence[Charge], now: float) -> Shortfall | None: ...

    async def adjust(self, deltas: Sequence[tuple[str, int]]) -> None:
        """Add (or with a negative delta, give back) amounts unconditionally: settle and release."""
        ...

    async def started(self, key: str, now: float, expires_at: float) -> float:
        """When the run behind `key` started: `now` for the first caller, the stored time after."""
        ...

    async def used(self, keys: Sequence[str], now: float | None = None) -> dict[str, int]: ...

    async def aclose(self) -> None: ...


class RuleSource(Protocol):
    """The budgets in force; may refresh itself from a shared store."""

    async def current(self) -> Sequence[BudgetRule]: ...


class StaticRules:
    """Budgets fixed at construction (the config file alone)."""

    def __init__(self, rules: Sequence[BudgetRule]) -> None:
        self._rules = tuple(rules)

    async def current(self) -> Sequence[BudgetRule]:
        return self._rules


@dataclass(frozen=True, slots=True)
class _Plan:
    rules: Sequence[BudgetRule]  # the rule set it was planned under (compared by identity)
    charges: tuple[Charge, ...]
    start: float  # valid while start <= now < end: inside every counted window
    end: float


class PlanCache:
    """`plan`'s answers, reused while they cannot change (a principal's calls of one tool ask the
    same question all day, and planning walks every rule on every call).

    A plan is keyed by everything `plan` reads from the call (action, resource, run, the principal's
    subject, roles and client, the estimate) and reused only under the same rule set (the object
    `RuleSource.current` returned: a rule book that changes builds a new one) and while `now` is
    inside every window it counted in (`window_bounds` of any such `now` is the same). A plan with a
    windowless run budget is never kept: its counters expire relative to `now`.
    """

    def __init__(self, run_ttl_s: float, max_entries: int = 4096) -> None:
        self._run_ttl_s = run_ttl_s
        self._max = max_entries
        self._plans: dict[tuple[object, ...], _Plan] = {}

    def charges(self, rules: Sequence[BudgetRule], call: Call, now: float) -> tuple[Charge, ...]:
        """`plan(rules, call, now, run_ttl_s)`, from the cache when it is still the same."""
        principal, estimate = call.principal, call.estimate
        key = (
            call.action,
            call.resource,
            run_key(call),
            None if principal is None else (principal.subject, principal.roles, principal.client_id),
            estimate.tokens,
            estimate.cost,
        )
        known = self._plans.get(key)
        if known is not None and known.rules is rules and known.start <= now < known.end:
            return known.charges
        charges = tuple(plan(rules, call, now, self._run_ttl_s))
        ends = [c.target.resets_at for c in charges]
        if None not in ends:
            if len(self._plans) >= self._max:  # keys come from callers (run ids, tools): stay bounded
                self._plans = {}
            start = max((c.target.start for c in charges), default=-math.inf)
            end = min((e for e in ends if e is not None), default=math.inf)
            self._plans[key] = _Plan(rules, charges, start, end)
        return charges


def settlement(charges: Sequence[Charge], actual: Usage) -> list[tuple[str, int]]:
    """The true-up: actual tokens and cost minus what was reserved, per counter."""
    amounts = {"tokens": max(actual.tokens, 0), "cost": max(round(actual.cost * COST_SCALE), 0)}
    out = []
    for charge in charges:
        if charge.metric in amounts and amounts[charge.metric] != charge.amount:
            out.append((charge.key, amounts[charge.metric] - charge.amount))
    return out


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _shown(metric: str, amount: int) -> str:
    return f"{amount / COST_SCALE:g}" if metric == "cost" else str(amount)


def exhausted(target: Target, metric: str, used: int, limit: int, now: float) -> BudgetExceeded:
    """The error for a budget that refused a call: names it and says when it resets."""
    rule = target.rule
    scope = f"{rule.per} {target.value}" + (f" on {target.resource}" if target.resource else "")
    what = (
        f"{metric} {_shown(metric, used)} of {_shown(metric, limit)}"
        if metric != "duration"
        else f"duration {used}s of {limit}s"
    )
    data: dict[str, object] = {
        "budget": rule.name,
        "per": rule.per,
        "metric": metric,
        "limit": limit / COST_SCALE if metric == "cost" else limit,
        "used": used / COST_SCALE if metric == "cost" else used,
        "window": rule.window,
        "resetsAt": None,
        "retryAfter": None,
    }
    headers: dict[str, str] = {}
    if target.resets_at is not None:
        retry_after = max(1, math.ceil(target.resets_at - now))
        data["resetsAt"] = _iso(target.resets_at)
        data["retryAfter"] = retry_after
        headers["Retry-After"] = str(retry_after)
        when = f"it resets at {data['resetsAt']} (in {retry_after}s)"
    else:
        when = "it does not reset: start a new run"
    return BudgetExceeded(
        f"budget {rule.name!r} exhausted for {scope}: {what}; {when}", headers=headers, data=data
    )


async def effective_budgets(
    rules: Sequence[BudgetRule], store: BudgetStore, principal: Principal, run: str | None, now: float
) -> list[dict[str, object]]:
    """The budgets `principal` (in `run`, if given) is under now, with what is used of each.

    Budgets counted per resource are listed with `used` None: each tool or model has its own count.

    Raises:
        Unavailable: the counters cannot be read.
    """
    found = targets(rules, principal, run, None, now)
    keys = [t.key(metric) for t in found for metric, _ in t.rule.limits()]
    used = await store.used(keys, now)
    lines: list[dict[str, object]] = []
    for target in found:
        rule = target.rule
        for metric, limit in rule.limits():
            value = None if rule.per_resource else used.get(target.key(metric), 0)
            scale = COST_SCALE if metric == "cost" else 1
            lines.append(
                {
                    "budget": rule.name,
                    "per": rule.per,
                    "value": target.value,
                    "resource": rule.resource + (" (each)" if rule.per_resource else ""),
                    "window": rule.window or "run",
                    "metric": metric,
                    "limit": limit / scale if metric == "cost" else limit,
                    "used": None if value is None else (value / scale if metric == "cost" else value),
                    "resetsAt": _iso(target.resets_at) if target.resets_at is not None else None,
                }
            )
        if rule.duration_s is not None:
            lines.append(
                {
                    "budget": rule.name,
                    "per": rule.per,
                    "value": target.value,
                    "resource": rule.resource,
                    "window": "run",
                    "metric": "duration_s",
                    "limit": rule.duration_s,
                    "used": None,
                    "resetsAt": None,
                }
            )
    return lines


# --- the stage ----------------------------------------------------------------------------------


class Budget:
    """Reserves before forwarding, trues up from `Reply.usage`, gives everything back when the call
    never left the gateway (`GatewayError.maybe_sent` false)."""

    def __init__(
        self,
        store: BudgetStore,
        rules: RuleSource,
        *,
        run_ttl_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._rules = rules
        self._run_ttl_s = run_ttl_s
        self._clock = clock
        self._plans = PlanCache(run_ttl_s)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        if call.action not in SPENDING_ACTIONS:
            return await call_next(call)
        rules = await self._rules.current()
        now = self._clock()
        await self._check_durations(rules, call, now)
        charges = self._plans.charges(rules, call, now)
        if charges:
            shortfall = await self._store.reserve(charges, now)
            if shortfall is not None:
                charge = charges[shortfall.index]
                raise exhausted(charge.target, charge.metric, shortfall.used, charge.limit, now)
        try:
            reply = await call_next(call)
        except GatewayError as exc:
            # Given back only when the call provably never left the gateway (a later stage refused
            # it, no connection was made). A call that may have reached the upstream (a timeout, a
            # broken or garbage answer) stays charged, as does one whose outcome is unknown (the
            # caller went away, a crash: not a GatewayError): a runaway agent against a slow tool
            # must be stopped, and the upstream may have done the work.
            if not exc.maybe_sent:
                with anyio.CancelScope(shield=True):
                    await self._adjust([(c.key, -c.amount) for c in charges], "release")
            raise
        if not charges:
            return reply
        if reply.streaming:

            async def settle(usage: Usage) -> None:
                await self._adjust(settlement(charges, usage), "settle")

            reply.on_settle(settle)
        elif reply.usage is not None:
            await self._adjust(settlement(charges, reply.usage), "settle")
        return reply

    async def _check_durations(self, rules: Sequence[BudgetRule], call: Call, now: float) -> None:
        timed = [r for r in rules if r.duration_s is not None]
        if not timed:
            return
        for target in targets(timed, call.principal, run_key(call), call.resource, now):
            assert target.rule.duration_s is not None
            key = target.key("started")
            started = await self._store.started(key, now, now + self._run_ttl_s)
            elapsed = now - started
            if elapsed > target.rule.duration_s:
                raise exhausted(
                    target, "duration", math.floor(elapsed), math.floor(target.rule.duration_s), now
                )

    async def _adjust(self, deltas: list[tuple[str, int]], what: str) -> None:
        if not deltas:
            return
        try:
            await self._store.adjust(deltas)
        except GatewayError as exc:
            # The call already happened (settle) or failed (release); failing it now would help no one.
            # The store said why (unreachable): one line, no traceback.
            log.error("budget %s failed; counters may be off until their window ends: %s", what, exc.message)
        except Exception:
            log.exception("budget %s failed; counters may be off until their window ends", what)
