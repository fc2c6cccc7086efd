"""The budgets in force: config-file rules plus rules made through the admin API, in SQL.

Rules declared in the config file are written at start-up with `source="config"` (the file owns
them; the API may not edit them), as the registry does for servers. A version row tells other
processes that something changed; `BudgetRuleBook.current()` looks at it at most every `poll_s`
seconds, so a rule edited on one node is in force on every node within seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anyio.to_thread
from sqlalchemy import JSON, Column, Engine
from sqlmodel import Field, Session, SQLModel, select

from agentgw.records.budget import BudgetRule
from agentgw.storage.owned_rows import OwnedRows

__all__ = ["BudgetRuleBook", "BudgetRuleConflict", "BudgetRuleRow", "BudgetRuleVersion"]

log = logging.getLogger(__name__)


class BudgetRuleConflict(ValueError):
    """A write the rule book refuses: the config file owns the rule, or the name is taken."""


class BudgetRuleRow(SQLModel, table=True):
    __tablename__ = "budget_rule"

    name: str = Field(primary_key=True)
    spec: dict[str, object] = Field(sa_column=Column(JSON, nullable=False))
    source: str = "api"  # config | api


class BudgetRuleVersion(SQLModel, table=True):
    __tablename__ = "budget_rule_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0


_TABLES = [BudgetRuleRow.__table__, BudgetRuleVersion.__table__]  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped


class BudgetRuleBook:
    """SQL rows behind an in-memory snapshot; implements `RuleSource` for the budget stage."""

    def __init__(self, engine: Engine, *, poll_s: float = 2.0) -> None:
        self._engine = engine
        self._poll_s = poll_s
        self._rules: tuple[BudgetRule, ...] = ()
        self._sources: dict[str, str] = {}
        self._version = -1
        self._checked = 0.0
        self._refreshing = False
        self._rows = OwnedRows(
            engine, BudgetRuleVersion, BudgetRuleConflict, lambda: self.refresh(force=True)
        )
        SQLModel.metadata.create_all(engine, tables=_TABLES)

    # --- reads ---
    async def current(self) -> Sequence[BudgetRule]:
        """The rules in force; refreshed in the background of one call at most every `poll_s`."""
        now = time.monotonic()
        if now - self._checked >= self._poll_s and not self._refreshing:
            self._refreshing = True
            try:
                await anyio.to_thread.run_sync(self.refresh)
            except Exception:
                log.exception("budget rules refresh failed; enforcing the last snapshot")
            finally:
                self._checked = now
                self._refreshing = False
        return self._rules

    def rules(self) -> list[tuple[BudgetRule, str]]:
        """Every rule with its source (`config` or `api`), by name."""
        return [(r, self._sources.get(r.name, "api")) for r in self._rules]

    def rule(self, name: str) -> tuple[BudgetRule, str] | None:
        found = next((r for r in self._rules if r.name == name), None)
        return None if found is None else (found, self._sources.get(name, "api"))

    # --- writes ---
    def sync_config(self, rules: Sequence[BudgetRule]) -> None:
        """Make the config file's rules the truth for the rows it owns (and drop the ones it dropped)."""
        self._rows.sync({BudgetRuleRow: {r.name: r.model_dump() for r in rules}})

    def put(self, rule: BudgetRule, *, replace: bool = True) -> None:
        """Add or replace an API-owned rule.

        Raises:
            BudgetRuleConflict: the config file owns the name, or it exists and `replace` is false.
        """
        self._rows.put(BudgetRuleRow, rule.name, rule.model_dump(), replace=replace, noun="budget")

    def remove(self, name: str) -> bool:
        """Remove an API-owned rule; returns whether it existed.

        Raises:
            BudgetRuleConflict: the config file owns it.
        """
        return self._rows.remove(BudgetRuleRow, name, noun="budget")

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the snapshot if another writer bumped the version; returns whether it changed.

        Raises:
            BudgetRuleConflict: a row does not validate (edited by hand, or by a newer version); the
                last good snapshot stays in force rather than a budget silently dropping out.
        """
        with Session(self._engine) as session:
            version = self._rows.version(session)
            if version == self._version and not force:
                return False
            rows = session.exec(select(BudgetRuleRow)).all()
        rules: list[BudgetRule] = []
        for r in sorted(rows, key=lambda r: r.name):
            try:
                rules.append(BudgetRule.model_validate(r.spec))
            except ValueError as exc:
                raise BudgetRuleConflict(f"budget rule {r.name!r} in the database is invalid: {exc}") from exc
        self._rules = tuple(rules)
        self._sources = {r.name: r.source for r in rows}
        self._version = version
        return True
