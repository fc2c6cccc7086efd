"""Rows that either the config file or the admin API owns (registry entries, budget rules).

GitOps: the config file is the truth for the rows it declares; the API may neither edit nor remove
them, and owns everything else. Every such table has `name` (key), `spec` (JSON) and `source`
(`config` or `api`). These helpers work inside the caller's session; the caller bumps its version
row and commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlmodel import Session, select

__all__ = ["put_owned", "remove_owned", "sync_owned"]


def sync_owned(session: Session, table: Any, specs: Mapping[str, dict[str, Any]]) -> None:
    """Make `specs` (name -> spec) the config-owned rows of `table`, dropping those no longer declared."""
    for row in session.exec(select(table).where(table.source == "config")).all():
        if row.name not in specs:
            session.delete(row)
    for name, spec in specs.items():
        session.merge(table(name=name, spec=spec, source="config"))


def put_owned(
    session: Session,
    table: Any,
    name: str,
    spec: dict[str, Any],
    *,
    replace: bool,
    noun: str,
    conflict: type[ValueError],
) -> None:
    """Add (or with `replace`, update) an API-owned row.

    Raises:
        conflict: the config file owns `name`, or it exists and `replace` is false.
    """
    row = session.get(table, name)
    if row is not None and row.source == "config":
        raise conflict(f"{noun} {name!r} is declared in the config file; edit it there")
    if row is not None and not replace:
        raise conflict(f"{noun} {name!r} already exists")
    session.merge(table(name=name, spec=spec, source="api"))


def remove_owned(session: Session, table: Any, name: str, *, noun: str, conflict: type[ValueError]) -> bool:
    """Delete an API-owned row; returns whether it existed.

    Raises:
        conflict: the config file owns `name`.
    """
    row = session.get(table, name)
    if row is None:
        return False
    if row.source == "config":
        raise conflict(f"{noun} {name!r} is declared in the config file; edit it there")
    session.delete(row)
    return True
