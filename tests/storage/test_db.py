"""The PostgreSQL engine heals by itself: after a failover through a read-only node, a hung server
and lost connections, the SQL stores (audit log, budget counters) refuse calls quickly while the
database is away and take them again once it is back, without a restart.

Faults go through a proxy in front of the machine's PostgreSQL (`tests/support/proxy.py`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord
from agentgw.records.budget import Charge, Shortfall
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog, verify
from agentgw.storage.budget.sql import SqlBudgetStore
from agentgw.storage.db import STATEMENT_TIMEOUT_S, DatabaseSettings
from tests.storage.budget.test_stores import NOW, charge
from tests.support.postgres import POSTGRES_ADMIN
from tests.support.proxy import TcpProxy

RECORD = AuditRecord(
    time="2026-01-01T12:00:00.000000Z",
    event="decision",
    request_id="r0",
    protocol="mcp",
    action="call",
    resource="mcp:github/create_issue",
    method="tools/call",
    upstream="github",
    decision="allowed",
    subject="user:alice",
)
# How long past its time limit a store may take to refuse a call (a slow, shared machine).
SLACK_S = 2.0


@dataclass
class Stores:
    """Both SQL stores of a gateway process, on one engine, as the gateway builds them by default."""

    engine: Engine
    budget: SqlBudgetStore
    audit: SqlAuditLog
    counter: str

    def one(self) -> list[Charge]:
        return [charge(self.counter, 1_000_000)]

    async def reserve(self) -> Shortfall | None:
        return await self.budget.reserve(self.one(), NOW)

    async def write(self) -> None:
        await self.audit.write(replace(RECORD, request_id=uuid.uuid4().hex))

    async def both(self) -> list[object]:
        """What a reservation and an audit record, at the same time, came to (None: done)."""
        return await asyncio.gather(self.reserve(), self.write(), return_exceptions=True)


@pytest.fixture
async def stores(own_postgres: str, postgres_proxy: TcpProxy) -> AsyncIterator[Stores]:
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{postgres_proxy.port}/{own_postgres}")
    built = Stores(engine, SqlBudgetStore(engine), SqlAuditLog(engine), f"k-{uuid.uuid4().hex}")
    assert await built.both() == [None, None]
    yield built
    postgres_proxy.resume()
    built.audit.close()
    await built.budget.aclose()
    engine.dispose()


def admin(sql: str) -> None:
    engine = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


async def attempts_until_both_work(stores: Stores, most: int) -> int:
    """How many attempts (each a reservation and an audit record) it took until both worked."""
    for attempt in range(1, most + 1):
        if await stores.both() == [None, None]:
            return attempt
    pytest.fail(f"the stores still refuse after {most} attempts")


async def test_after_a_failover_through_a_read_only_node_both_sql_stores_write_again_by_themselves(
    stores: Stores, own_postgres: str, postgres_proxy: TcpProxy
) -> None:
    """A failover, as the gateway sees it: its connections are cut; those it opens meanwhile land on
    a node that takes no writes (a standby not yet promoted, or the old primary demoted); then the
    address leads to a writable primary again, for new connections only. Simulated on one server:
    the test's own database is made read-only for new sessions while the proxy cuts every connection,
    then writable again for new sessions, while the sessions opened in between stay read-only, as
    sessions still attached to the read-only node would.
    """
    admin(f'ALTER DATABASE "{own_postgres}" SET default_transaction_read_only = on')
    postgres_proxy.cut()
    during = await asyncio.gather(*(stores.both() for _ in range(5)))
    assert all(isinstance(outcome, Unavailable) for outcomes in during for outcome in outcomes)

    admin(f'ALTER DATABASE "{own_postgres}" RESET default_transaction_read_only')
    assert await attempts_until_both_work(stores, most=3) <= 2
    after = await asyncio.gather(*(stores.both() for _ in range(20)))
    assert after == [[None, None]] * 20


async def test_while_the_database_hangs_sql_store_calls_are_refused_within_their_time_limit(
    stores: Stores, postgres_proxy: TcpProxy
) -> None:
    postgres_proxy.pause()
    started = time.monotonic()
    # More calls than the pool has connections: those waiting for one are refused in time too.
    calls = [stores.reserve() for _ in range(25)] + [stores.write() for _ in range(5)]
    outcomes = await postgres_proxy.answer_within(
        asyncio.gather(*calls, return_exceptions=True), STATEMENT_TIMEOUT_S + SLACK_S
    )
    assert isinstance(outcomes, list)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert "audit log unavailable" in str(outcomes[-1])
    assert time.monotonic() - started < STATEMENT_TIMEOUT_S + SLACK_S
    # Once the writer's commit has hung past the limit (by now, or by the end of this next record's
    # wait), a record is refused at once, not after another time limit.
    await postgres_proxy.answer_within(stores.write(), STATEMENT_TIMEOUT_S + SLACK_S)
    at_once = await postgres_proxy.answer_within(stores.write(), 1.0)
    assert isinstance(at_once, Unavailable) and "has not answered" in str(at_once)

    postgres_proxy.resume()
    await postgres_proxy.answer_within(stores.audit.flush(), SLACK_S)  # the hung commit is done
    assert await attempts_until_both_work(stores, most=3) == 1


async def test_after_lost_connections_and_a_refusing_server_the_sql_stores_work_again(
    stores: Stores, postgres_proxy: TcpProxy
) -> None:
    postgres_proxy.cut()
    assert await attempts_until_both_work(stores, most=3) <= 2

    postgres_proxy.refuse()
    refused = await postgres_proxy.answer_within(stores.both(), SLACK_S)
    assert isinstance(refused, list) and all(isinstance(o, Unavailable) for o in refused)
    postgres_proxy.resume()
    assert await attempts_until_both_work(stores, most=3) <= 2


async def test_an_audit_commit_whose_answer_was_lost_does_not_wedge_the_chain(
    stores: Stores, postgres_proxy: TcpProxy
) -> None:
    """The connection breaks after the server committed a batch and before the gateway heard so: the
    batch counts as failed (its calls are refused), the next records continue the chain after it."""
    postgres_proxy.lose_answer_after(b"COMMIT")
    lost = await postgres_proxy.answer_within(stores.write(), SLACK_S)
    assert isinstance(lost, Unavailable)
    assert await attempts_until_both_work(stores, most=3) <= 2
    await stores.audit.flush()
    report = verify(stores.engine)
    assert report.ok, report.problem
    assert report.records == 3  # the fixture's, the lost answer's, the one after


def test_the_gateway_s_statement_timeout_is_enforced_by_the_server(postgres_url: str) -> None:
    engine = make_engine(postgres_url, DatabaseSettings(statement_timeout_s=0.2))
    try:
        with engine.connect() as conn, pytest.raises(OperationalError, match="statement timeout"):
            conn.execute(text("SELECT pg_sleep(2)"))
        with engine.connect() as conn:  # the connection was not spoiled for the next call
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
