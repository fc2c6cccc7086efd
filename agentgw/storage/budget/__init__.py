"""Budget counters and rules. The stores implement the budget stage's `BudgetStore` structurally:

- `local` (the default, `local.py`): this process's memory, written behind to the gateway's
  database; one gateway process per database.
- `sql` (`sql.py`): every reservation a transaction in the gateway's database (SQLite or
  PostgreSQL); many processes.
- `redis` (`redis.py`): one Lua script per operation; many nodes.

Each reserves all of a call's charges or none. A counter expires with its window (or, for runs,
`run_ttl_s` after the run's first call); an expired counter starts again from zero. The rules in
force (config file plus admin API) are in `rules.py`.
"""

from __future__ import annotations

from sqlalchemy import Engine

from agentgw.errors import ConfigError
from agentgw.records.budget import BudgetSettings
from agentgw.storage.budget.local import LocalBudgetStore
from agentgw.storage.budget.redis import RedisBudgetStore
from agentgw.storage.budget.sql import SqlBudgetStore
from agentgw.storage.db import DatabaseSettings
from agentgw.storage.redis_client import RedisSettings

__all__ = ["LocalBudgetStore", "RedisBudgetStore", "SqlBudgetStore", "budget_reader", "budget_store"]


def budget_store(
    settings: BudgetSettings,
    engine: Engine,
    shared_redis_url: str | None = None,
    *,
    database: DatabaseSettings | None = None,
    redis: RedisSettings | None = None,
) -> LocalBudgetStore | SqlBudgetStore | RedisBudgetStore:
    """The store `settings.store` names; Redis at `budgets.redis_url`, else the gateway's `redis_url`.

    `database` and `redis` give the time limit of a SQL store's calls and the Redis client's limits.

    Raises:
        ConfigError: the Redis store is chosen but no Redis URL is set; or the local store is chosen
            and another live process owns this database's ledger.
    """
    if settings.store == "redis":
        url = settings.redis_url or shared_redis_url
        if not url:
            raise ConfigError("budgets.store is redis: set budgets.redis_url or redis_url")
        return RedisBudgetStore(url, settings.redis_prefix, redis)
    if settings.store == "local":
        return LocalBudgetStore(engine, flush_s=settings.flush_s)
    return SqlBudgetStore(engine, timeout_s=(database or DatabaseSettings()).statement_timeout_s)


def budget_reader(
    settings: BudgetSettings, engine: Engine, shared_redis_url: str | None = None
) -> LocalBudgetStore | SqlBudgetStore | RedisBudgetStore:
    """A store for reading counters from another process (`agentgw budget show`).

    A local ledger belongs to the gateway process; its counters are read from the table it writes
    to (at most `flush_s` behind), without taking its lease.

    Raises:
        ConfigError: as for `budget_store`.
    """
    if settings.store == "local":
        return SqlBudgetStore(engine)
    return budget_store(settings, engine, shared_redis_url)
