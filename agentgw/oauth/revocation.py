"""Revoking a stored credential (an API key, a registered client): a timestamp, never a deletion.

The row stays so that the audit trail can still name what a past call was made with.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

__all__ = ["revoke_row"]


class _Revocable(Protocol):
    revoked: datetime | None


_Row = TypeVar("_Row", bound=_Revocable)


def revoke_row(engine: Engine, table: type[_Row], key: str) -> bool:
    """Mark row `key` of `table` revoked now; False if there is no such row (revoking twice is fine)."""
    with Session(engine) as session:
        row = session.get(table, key)
        if row is None:
            return False
        if row.revoked is None:
            row.revoked = datetime.now(UTC)
            session.add(row)
            session.commit()
        return True
