"""Budget records: rules that refuse to be inconsistent, and pure planning of what a call reserves."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentgw.call import Call, Principal, Usage
from agentgw.records.budget import (
    BudgetRule,
    BudgetSettings,
    admits,
    plan,
    run_key,
    targets,
    window_bounds,
)

ALICE = Principal(subject="user:alice", client_id="ci-bot", roles=("role:dev", "role:ops"))
NOON = 1_767_268_800.0  # 2026-01-01T12:00:00Z


def call(
    resource: str = "mcp:github/create_issue",
    *,
    action: str = "call",
    run: str | None = "run-1",
    session: str | None = None,
    principal: Principal = ALICE,
    estimate: Usage | None = None,
) -> Call:
    made = Call(
        protocol="mcp",
        action=action,  # type: ignore[arg-type]
        resource=resource,
        upstream="github",
        method="tools/call",
        run_id=run,
        session_id=session,
        principal=principal,
    )
    if estimate is not None:
        made.estimate = estimate
    return made


# --- rules -------------------------------------------------------------------------------------


def test_a_budget_without_any_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="sets no limit"):
        BudgetRule(name="empty")


def test_a_principal_budget_needs_a_window() -> None:
    with pytest.raises(ValidationError, match="needs a window"):
        BudgetRule(name="alice", per="subject", calls=3)


def test_duration_is_for_run_budgets_only() -> None:
    with pytest.raises(ValidationError, match="run budgets only"):
        BudgetRule(name="alice", per="subject", window="day", duration_s=60)


def test_budget_names_are_unique_and_plain() -> None:
    with pytest.raises(ValidationError, match="unique"):
        BudgetSettings(rules=[BudgetRule(name="a", calls=1), BudgetRule(name="a", calls=2)])
    with pytest.raises(ValidationError):
        BudgetRule(name="has space", calls=1)
    with pytest.raises(ValidationError, match="reserved"):
        BudgetRule(name="effective", calls=1)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValidationError):
        BudgetRule(name="neg", calls=-1)


# --- pure planning -----------------------------------------------------------------------------


def test_windows_are_calendar_windows_in_utc() -> None:
    assert window_bounds("minute", NOON + 59.5) == (NOON, NOON + 60)
    assert window_bounds("hour", NOON + 3599) == (NOON, NOON + 3600)
    assert window_bounds("day", NOON) == (NOON - 12 * 3600, NOON + 12 * 3600)
    start, end = window_bounds("month", NOON)
    assert (start, end) == (1_767_225_600.0, 1_769_904_000.0)  # 2026-01-01 .. 2026-02-01
    december = window_bounds("month", 1_796_083_200.0)  # 2026-12-01T00:00:00Z
    assert december == (1_796_083_200.0, 1_798_761_600.0)  # .. 2027-01-01


def test_the_run_is_the_run_id_else_the_session_else_none() -> None:
    assert run_key(call(run="r", session="s")) == "r"
    assert run_key(call(run=None, session="s")) == "s"
    assert run_key(call(run=None, session=None)) is None


def test_a_call_is_charged_once_per_matching_budget_and_metric() -> None:
    rules = [
        BudgetRule(name="run", calls=10, tokens=1000),
        BudgetRule(name="alice", per="subject", match="user:alice", window="minute", calls=5),
        BudgetRule(name="bob", per="subject", match="user:bob", window="minute", calls=5),
        BudgetRule(name="devs", per="role", match="role:dev", window="hour", cost=2.5),
        BudgetRule(name="clients", per="client", window="day", calls=100),
        BudgetRule(name="slack", resource="mcp:slack/*", calls=1),
    ]
    charges = plan(rules, call(estimate=Usage(tokens=40, cost=0.25)), NOON, 3600)
    summary = sorted((c.target.rule.name, c.target.value, c.metric, c.amount, c.limit) for c in charges)
    assert summary == [
        ("alice", "user:alice", "calls", 1, 5),
        ("clients", "ci-bot", "calls", 1, 100),
        ("devs", "role:dev", "cost", 250_000, 2_500_000),
        ("run", "run-1", "calls", 1, 10),
        ("run", "run-1", "tokens", 40, 1000),
    ]
    by_rule = {c.target.rule.name: c for c in charges}
    assert by_rule["alice"].expires_at == NOON + 60
    assert by_rule["run"].expires_at == NOON + 3600  # the run TTL


def test_discovery_and_session_messages_spend_nothing() -> None:
    rules = [BudgetRule(name="run", calls=1)]
    assert plan(rules, call(action="list"), NOON, 60) == []
    assert plan(rules, call(action="session"), NOON, 60) == []
    assert len(plan(rules, call(action="read"), NOON, 60)) == 1
    assert len(plan(rules, call(action="send"), NOON, 60)) == 1


def test_a_call_in_no_run_is_not_under_run_budgets() -> None:
    assert plan([BudgetRule(name="run", calls=1)], call(run=None), NOON, 60) == []


def test_per_resource_budgets_count_each_tool_apart() -> None:
    rule = BudgetRule(name="per-tool", per_resource=True, calls=2)
    first = plan([rule], call("mcp:github/a"), NOON, 60)[0]
    second = plan([rule], call("mcp:github/b"), NOON, 60)[0]
    assert first.key != second.key


def test_counter_keys_keep_their_stored_form() -> None:
    # Counters outlive a gateway version in the database: the key of a counter must not change.
    rule = BudgetRule(name="a:b", per="subject", window="day", resource="mcp:x/*", per_resource=True, calls=1)
    target = targets([rule], Principal(subject="user:a|b"), None, "mcp:x/y z", NOON)[0]
    assert target.key("calls") == "a%3Ab|subject|user%3Aa%7Cb|1767225600|mcp%3Ax%2Fy%20z|calls"
    shared = targets([BudgetRule(name="r", shared_run=True, calls=1)], ALICE, "run/1", "mcp:x/y", NOON)[0]
    assert shared.key("tokens") == "r|run|run%2F1|run|tokens"
    owned = targets([BudgetRule(name="r", calls=1)], ALICE, "run/1", "mcp:x/y", NOON)[0]
    assert owned.key("tokens") == "r|run|user%3Aalice/run%2F1|run|tokens"


def test_a_run_is_counted_per_principal_unless_the_rule_shares_it() -> None:
    bob = Principal(subject="user:bob")
    owned, shared = BudgetRule(name="own", calls=1), BudgetRule(name="shared", shared_run=True, calls=1)
    alice_keys = {t.key("calls") for t in targets([owned, shared], ALICE, "run-42", "x", NOON)}
    bob_keys = {t.key("calls") for t in targets([owned, shared], bob, "run-42", "x", NOON)}
    assert alice_keys & bob_keys == {"shared|run|run-42|run|calls"}
    # No subject and run id can spell another pair's counter: `/` in either part is encoded.
    one = targets([owned], Principal(subject="a/b"), "c", "x", NOON)[0]
    other = targets([owned], Principal(subject="a"), "b/c", "x", NOON)[0]
    assert one.key("calls") != other.key("calls")
    with pytest.raises(ValidationError, match="run budgets only"):
        BudgetRule(name="x", per="subject", window="day", shared_run=True, calls=1)


def test_a_value_cannot_forge_another_counter_key() -> None:
    rule = BudgetRule(name="subjects", per="subject", window="minute", calls=1)
    key = targets([rule], Principal(subject="a|minute|b"), None, "x", NOON)[0].key("calls")
    assert key.split("|") == ["subjects", "subject", "a%7Cminute%7Cb", str(int(NOON)), "calls"]


def test_nothing_fits_an_exhausted_counter_even_a_zero_estimate() -> None:
    assert admits(9, 1, 10)
    assert not admits(10, 1, 10)
    assert admits(0, 0, 10)
    assert not admits(10, 0, 10)
    assert not admits(12, 0, 10)
