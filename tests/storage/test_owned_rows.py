"""Config-owned and API-owned rows: every write bumps the version row other processes poll; a write
that is refused or changes nothing bumps nothing (their snapshots are not reloaded for nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from agentgw.storage import make_engine
from agentgw.storage.budget.rules import (
    BudgetRuleBook,  # creates the tables
    BudgetRuleConflict,
    BudgetRuleRow,
    BudgetRuleVersion,
)
from agentgw.storage.owned_rows import OwnedRows


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'rows.db'}")
    BudgetRuleBook(engine)
    return engine


def rows(engine: Engine, written: list[int]) -> OwnedRows:
    return OwnedRows(engine, BudgetRuleVersion, BudgetRuleConflict, lambda: written.append(1))


def version(engine: Engine, owned: OwnedRows) -> int:
    with Session(engine) as session:
        return owned.version(session)


def test_every_write_bumps_the_version_once_and_tells_the_owner(engine: Engine) -> None:
    written: list[int] = []
    owned = rows(engine, written)
    assert version(engine, owned) == 0
    owned.sync({BudgetRuleRow: {"from-file": {"x": 1}}})
    owned.put(BudgetRuleRow, "api", {"x": 2}, replace=False, noun="budget")
    assert owned.remove(BudgetRuleRow, "api", noun="budget") is True
    assert version(engine, owned) == 3 and written == [1, 1, 1]


def test_refused_and_empty_writes_bump_nothing(engine: Engine) -> None:
    written: list[int] = []
    owned = rows(engine, written)
    owned.sync({BudgetRuleRow: {"from-file": {"x": 1}}})
    with pytest.raises(BudgetRuleConflict, match="declared in the config file"):
        owned.put(BudgetRuleRow, "from-file", {"x": 2}, replace=True, noun="budget")
    with pytest.raises(BudgetRuleConflict, match="declared in the config file"):
        owned.remove(BudgetRuleRow, "from-file", noun="budget")

    def refuse(session: Session) -> None:
        raise BudgetRuleConflict("refused by the owner's own check")

    with pytest.raises(BudgetRuleConflict, match="own check"):
        owned.put(BudgetRuleRow, "new", {"x": 3}, replace=False, noun="budget", check=refuse)
    assert owned.remove(BudgetRuleRow, "never-there", noun="budget") is False
    assert version(engine, owned) == 1 and written == [1]
    with Session(engine) as session:
        assert session.get(BudgetRuleRow, "new") is None
        stored = session.get(BudgetRuleRow, "from-file")
        assert stored is not None and stored.spec == {"x": 1}
