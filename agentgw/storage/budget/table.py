"""The `budget_counter` table: where the SQL store counts, and where the local store saves its ledger."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, String
from sqlmodel import Field, SQLModel

__all__ = ["KEY_MAX", "PRUNE_EVERY_S", "BudgetCounter", "counter_table"]

# Expired counters are deleted at most this often, by whichever reservation (or save) comes along.
PRUNE_EVERY_S = 300.0
KEY_MAX = 512  # the longest counter key the table holds


class BudgetCounter(SQLModel, table=True):
    __tablename__ = "budget_counter"

    key: str = Field(primary_key=True, sa_type=String(KEY_MAX))
    used: int = Field(default=0, sa_type=BigInteger)
    expires_at: float = Field(index=True, sa_type=Float)


counter_table = BudgetCounter.__table__  # type: ignore[attr-defined]  # SQLModel declares __table__ untyped
