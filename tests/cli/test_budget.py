"""`agentgw budget show|list`: the budgets in force for a principal, and what is used of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from agentgw.call import Call, Principal, Reply
from agentgw.cli import main
from agentgw.filters.budget import Budget, StaticRules
from agentgw.records.budget import BudgetRule
from agentgw.storage import make_engine
from agentgw.storage.budget import LocalBudgetStore, SqlBudgetStore
from agentgw.storage.budget.rules import BudgetRuleBook

RULES = [
    {"name": "alice-daily", "per": "subject", "match": "user:alice", "window": "day", "calls": 100},
    {"name": "devs-hourly", "per": "role", "match": "role:dev", "window": "hour", "cost": 2.5},
    {"name": "run-calls", "per": "run", "calls": 50},
    {"name": "bob-daily", "per": "subject", "match": "user:bob", "window": "day", "calls": 5},
]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    url = f"sqlite:///{tmp_path / 'agentgw.db'}"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"database_url": url, "budgets": {"rules": RULES}}))
    return config, url


def spend(url: str, calls: int) -> None:
    engine = make_engine(url)
    stage = Budget(SqlBudgetStore(engine), StaticRules([BudgetRule.model_validate(r) for r in RULES]))
    alice = Principal(subject="user:alice", roles=("role:dev",))

    async def forward(_: Call) -> Reply:
        return Reply()

    async def run() -> None:
        for _ in range(calls):
            made = Call("mcp", "call", "mcp:x/y", "x", "tools/call", run_id="r1", principal=alice)
            await stage(made, forward)

    asyncio.run(run())
    engine.dispose()


def test_show_lists_the_budgets_a_principal_is_under_with_usage(
    setup: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, url = setup
    spend(url, 3)
    assert (
        main(
            [
                "budget",
                "show",
                "user:alice",
                "--role",
                "role:dev",
                "--run",
                "r1",
                "--config",
                str(config),
                "--format",
                "json",
            ]
        )
        == 0
    )
    lines = {(line["budget"], line["metric"]): line for line in json.loads(capsys.readouterr().out)}
    assert set(lines) == {("alice-daily", "calls"), ("devs-hourly", "cost"), ("run-calls", "calls")}
    assert lines[("alice-daily", "calls")]["used"] == 3 and lines[("run-calls", "calls")]["used"] == 3
    assert lines[("devs-hourly", "cost")]["limit"] == 2.5
    assert lines[("alice-daily", "calls")]["resetsAt"].endswith("T00:00:00Z")


def test_show_reads_the_saved_counts_while_a_gateway_owns_the_local_ledger(
    setup: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, url = setup
    engine = make_engine(url)
    ledger = LocalBudgetStore(engine)  # the running gateway's store holds the database's lease
    stage = Budget(ledger, StaticRules([BudgetRule.model_validate(r) for r in RULES]))
    alice = Principal(subject="user:alice", roles=("role:dev",))

    async def forward(_: Call) -> Reply:
        return Reply()

    async def run() -> None:
        for _ in range(4):
            await stage(Call("mcp", "call", "mcp:x/y", "x", "tools/call", principal=alice), forward)

    asyncio.run(run())
    assert ledger.flush()
    try:
        assert main(["budget", "show", "user:alice", "--config", str(config), "--format", "json"]) == 0
    finally:
        asyncio.run(ledger.aclose())
        engine.dispose()
    lines = {line["budget"]: line for line in json.loads(capsys.readouterr().out)}
    assert lines["alice-daily"]["used"] == 4


def test_show_as_a_table_and_for_a_principal_under_no_budget(
    setup: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    assert main(["budget", "show", "user:bob", "--config", str(config)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.startswith("budget\tper\tvalue") and row.startswith("bob-daily\tsubject\tuser:bob")
    assert main(["budget", "show", "user:carol", "--config", str(config)]) == 0
    assert "no budget applies to user:carol" in capsys.readouterr().out


def test_list_shows_config_and_api_budgets(
    setup: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, url = setup
    engine = make_engine(url)
    BudgetRuleBook(engine).put(BudgetRule(name="from-api", calls=7))
    engine.dispose()
    assert main(["budget", "list", "--config", str(config)]) == 0
    sources = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert sources == {
        "alice-daily": "config",
        "bob-daily": "config",
        "devs-hourly": "config",
        "from-api": "api",
        "run-calls": "config",
    }
