"""Rows that either the config file or the admin API owns (registry entries, budget rules).

GitOps: the config file is the truth for the rows it declares; the API may neither edit nor remove
them, and owns everything else. Every such table has `name` (key), `spec` (JSON) and `source`
(`config` or `api`). Beside its tables, each owner keeps a version row (`id` 1, `version`) that every
write bumps in the same transaction: other processes poll that one row to learn that their snapshot
is stale, rather than reading every row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

__all__ = ["OwnedRows"]


class OwnedRows:
    """The writes to one owner's tables, each bumping `version_table`'s row, and the poll of that row.

    `conflict` is what a refused write raises (`noun` in its message names what the table holds);
    `written` is called after every committed write, so that the owner's own snapshot never lags.
    """

    def __init__(
        self, engine: Engine, version_table: Any, conflict: type[ValueError], written: Callable[[], object]
    ) -> None:
        self._engine = engine
        self._version_table = version_table
        self._conflict = conflict
        self._written = written

    def version(self, session: Session) -> int:
        """The version row's number (0 before the first write)."""
        row = session.get(self._version_table, 1)
        return row.version if row else 0

    def _bump(self, session: Session) -> None:
        row = session.get(self._version_table, 1) or self._version_table()
        row.version += 1
        session.add(row)

    def sync(self, specs: Mapping[Any, Mapping[str, dict[str, Any]]]) -> None:
        """Make `specs` (table -> name -> spec) the config-owned rows of each table, dropping those no
        longer declared."""
        with Session(self._engine) as session:
            for table, declared in specs.items():
                for row in session.exec(select(table).where(table.source == "config")).all():
                    if row.name not in declared:
                        session.delete(row)
                for name, spec in declared.items():
                    session.merge(table(name=name, spec=spec, source="config"))
            self._bump(session)
            session.commit()
        self._written()

    def put(
        self,
        table: Any,
        name: str,
        spec: dict[str, Any],
        *,
        replace: bool,
        noun: str,
        check: Callable[[Session], None] | None = None,
    ) -> None:
        """Add (or with `replace`, update) an API-owned row; `check` may refuse it first, by raising,
        from what the same transaction reads.

        Raises:
            ValueError: (`conflict`) the config file owns `name`, or it exists and `replace` is false;
                or what `check` raised.
        """
        with Session(self._engine) as session:
            if check is not None:
                check(session)
            row = session.get(table, name)
            if row is not None and row.source == "config":
                raise self._conflict(f"{noun} {name!r} is declared in the config file; edit it there")
            if row is not None and not replace:
                raise self._conflict(f"{noun} {name!r} already exists")
            session.merge(table(name=name, spec=spec, source="api"))
            self._bump(session)
            session.commit()
        self._written()

    def remove(self, table: Any, name: str, *, noun: str) -> bool:
        """Delete an API-owned row; returns whether it existed (no write, no bump, when it did not).

        Raises:
            ValueError: (`conflict`) the config file owns `name`.
        """
        with Session(self._engine) as session:
            row = session.get(table, name)
            if row is None:
                return False
            if row.source == "config":
                raise self._conflict(f"{noun} {name!r} is declared in the config file; edit it there")
            session.delete(row)
            self._bump(session)
            session.commit()
        self._written()
        return True
