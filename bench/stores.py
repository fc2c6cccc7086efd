"""The shared stores under load and under faults, driven directly (no gateway, no HTTP).

    python -m bench stores [--duration 60] [--concurrency 50,150] [--fault-s 10] [--only load|faults]

Load: for each store (`sql` on PostgreSQL, `redis`) and concurrency C, C workers each reserve one
unit of one shared counter and release it (the budget stage's reserve and settle) back to back for
`--duration` seconds; refused = the store raised `Unavailable`.

Faults: a proxy (tests/support/proxy.py) in front of PostgreSQL or Redis; one caller calls the
store back to back (the PostgreSQL audit log: a record written and waited for; the budget stores: a
reservation). After 2 s the fault starts, lasts `--fault-s`, and is cleared; recovery is the time
from clearing to the first call that works. Faults: `failover` (connections cut while the database
turns read-only for new sessions, writable again at clearing: see tests/storage/test_db.py),
`pause` (no byte moves), `cut` (every connection reset; cleared at once).

Needs PostgreSQL at `--postgres` (a database is created and dropped) and Redis at `--redis`; runs
against whatever checkout it is started in (older ones take the stores' default settings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import create_engine, make_url, text

from agentgw.call import Principal
from agentgw.errors import Unavailable
from agentgw.records.audit import AuditRecord
from agentgw.records.budget import BudgetRule, Charge, targets
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog
from agentgw.storage.budget import RedisBudgetStore, SqlBudgetStore
from tests.support.postgres import fresh_database
from tests.support.proxy import TcpProxy

__all__ = ["add_arguments", "main"]

NOW = 1_767_268_800.0
GIVE_UP_S = 60.0  # after clearing a fault: a store that has not recovered by then is reported so
RECORD = AuditRecord(
    time="2026-01-01T12:00:00.000000Z",
    event="decision",
    request_id="r0",
    protocol="mcp",
    action="call",
    resource="mcp:bench/echo",
    method="tools/call",
    upstream="bench",
    decision="allowed",
    subject="user:bench",
)

Call = Callable[[], Awaitable[None]]


def one_charge(key: str) -> list[Charge]:
    rule = BudgetRule(name="bench", calls=10**12)
    target = targets([rule], Principal(subject="bench"), "run", "x", NOW)[0]
    return [Charge(key, 1, 10**12, NOW + 3600, target, "calls")]


def engine_of(url: str) -> Any:
    """The engine as the gateway builds it (with its settings where the checkout has them)."""
    try:
        from agentgw.storage.db import DatabaseSettings
    except ImportError:
        return make_engine(url)
    return make_engine(url, DatabaseSettings())


def admin_sql(admin_url: str, sql: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(sql))
    admin.dispose()


def pg_url(admin_url: str, database: str, port: int | None = None) -> str:
    url = make_url(admin_url).set(database=database)
    if port is not None:
        url = url.set(host="127.0.0.1", port=port)
    return url.render_as_string(hide_password=False)


# --- load -------------------------------------------------------------------------------------


@dataclass
class LoadRow:
    store: str
    concurrency: int
    seconds: float
    ok: int
    refused: int
    p50_ms: float
    p99_ms: float
    first_refusal: str | None

    def line(self) -> str:
        total = self.ok + self.refused
        share = 100 * self.refused / total if total else 0.0
        return (
            f"{self.store:<15} {self.concurrency:>4} {self.seconds:>5.0f} {total:>9}"
            f" {self.ok / self.seconds:>8.0f} {self.refused:>8} {share:>7.2f}%"
            f" {self.p50_ms:>7.1f} {self.p99_ms:>7.1f}  {self.first_refusal or ''}"
        )


LOAD_HEADER = (
    f"{'store':<15} {'c':>4} {'s':>5} {'calls':>9} {'calls/s':>8} {'refused':>8} {'share':>8}"
    f" {'p50 ms':>7} {'p99 ms':>7}"
)


async def load(name: str, store: Any, concurrency: int, duration: float) -> LoadRow:
    key = f"bench-{uuid.uuid4().hex}"
    charges = one_charge(key)
    latencies: list[float] = []
    refused = 0
    first: str | None = None
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal refused, first
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                await store.reserve(charges, NOW)
                await store.adjust([(key, -1)])
            except Unavailable as exc:
                refused += 1
                first = first or str(exc)
                # A refusal can come without the loop having run: yield, as a caller answered 503 would.
                await asyncio.sleep(0)
                continue
            latencies.append((time.monotonic() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - started
    latencies.sort()

    def pct(f: float) -> float:
        return latencies[min(len(latencies) - 1, int(f * len(latencies)))] if latencies else 0.0

    return LoadRow(name, concurrency, seconds, len(latencies), refused, pct(0.5), pct(0.99), first)


@contextlib.asynccontextmanager
async def load_store(kind: str, args: argparse.Namespace, database: str) -> AsyncIterator[Any]:
    if kind == "redis":
        store: Any = RedisBudgetStore(args.redis, f"agentgw-bench:{uuid.uuid4().hex}:")
        try:
            yield store
        finally:
            await store.aclose()
        return
    engine = engine_of(pg_url(args.postgres, database))
    try:
        yield SqlBudgetStore(engine)
    finally:
        engine.dispose()


# --- faults -----------------------------------------------------------------------------------


@dataclass
class FaultRow:
    store: str
    fault: str
    during_calls: int
    during_refused: int
    longest_ms: float
    recovered_s: float | None
    refused_after: int

    def line(self) -> str:
        recovered = f"{self.recovered_s:.2f}" if self.recovered_s is not None else f">{GIVE_UP_S:.0f}"
        return (
            f"{self.store:<13} {self.fault:<9} {self.during_calls:>6} {self.during_refused:>8}"
            f" {self.longest_ms:>11.0f} {recovered:>12} {self.refused_after:>13}"
        )


FAULT_HEADER = (
    f"{'store':<13} {'fault':<9} {'calls':>6} {'refused':>8} {'longest ms':>11} {'recovered s':>12}"
    f" {'refused after':>13}"
)


async def probe(call: Call, start: Callable[[], None], clear: Callable[[], None], fault_s: float) -> FaultRow:
    """One caller calling back to back while a timeline breaks the store 2 s in and clears it `fault_s`
    later (on its own: a call that hangs does not hold it up); then until the first call started after
    clearing works. "During" are the calls that overlap the fault."""
    marks: dict[str, float] = {}

    async def timeline() -> None:
        await asyncio.sleep(2.0)
        marks["broken"] = time.monotonic()
        await asyncio.to_thread(start)
        await asyncio.sleep(fault_s)
        await asyncio.to_thread(clear)
        marks["cleared"] = time.monotonic()

    faults = asyncio.create_task(timeline())
    calls: list[tuple[float, float, bool]] = []
    recovered: float | None = None
    while True:
        began = time.monotonic()
        cleared = marks.get("cleared")
        if cleared is not None and began - cleared >= GIVE_UP_S:
            break
        try:
            await call()
            ok = True
        except Unavailable:
            ok = False
        ended = time.monotonic()
        calls.append((began, ended, ok))
        if ok and cleared is not None:
            recovered = ended - cleared
            break
        if not ok:
            await asyncio.sleep(0.01)  # a refusal can be instant: do not spin
    await faults
    broken, cleared = marks["broken"], marks["cleared"]
    during = [(b, e, ok) for b, e, ok in calls if e > broken and b < cleared]
    after = [ok for b, _, ok in calls if b >= cleared]
    return FaultRow(
        "",
        "",
        len(during),
        sum(not ok for _, _, ok in during),
        max((e - b for b, e, _ in during), default=0.0) * 1000,
        recovered,
        after.count(False),
    )


async def fault_run(store: str, fault: str, args: argparse.Namespace) -> FaultRow:
    redis = store == "redis-budget"
    target = (urlsplit(args.redis).port or 6379) if redis else (make_url(args.postgres).port or 5432)
    with contextlib.ExitStack() as stack:
        database = "" if redis else stack.enter_context(fresh_database(args.postgres, "agentgw_bench"))
        proxy = stack.enter_context(TcpProxy(target))
        call: Call
        close: Callable[[], Awaitable[None]]
        if redis:
            budget = RedisBudgetStore(
                f"redis://127.0.0.1:{proxy.port}/0", f"agentgw-bench:{uuid.uuid4().hex}:"
            )
            charges = one_charge("k")

            async def reserve() -> None:
                await budget.reserve(charges, NOW)

            call, close = reserve, budget.aclose
        else:
            engine = engine_of(pg_url(args.postgres, database, proxy.port))
            stack.callback(engine.dispose)
            if store == "pg-audit":
                log = SqlAuditLog(engine)
                stack.callback(log.close)

                async def write() -> None:
                    await log.write(replace(RECORD, request_id=uuid.uuid4().hex))

                call = write
            else:
                sql = SqlBudgetStore(engine)
                charges = one_charge("k")

                async def reserve_sql() -> None:
                    await sql.reserve(charges, NOW)

                call = reserve_sql

            async def nothing() -> None:
                return None

            close = nothing
        await call()  # connected and warm
        alter = f'ALTER DATABASE "{database}"'
        if fault == "failover":

            def start() -> None:
                admin_sql(args.postgres, f"{alter} SET default_transaction_read_only = on")
                proxy.cut()

            def clear() -> None:
                admin_sql(args.postgres, f"{alter} RESET default_transaction_read_only")

            row = await probe(call, start, clear, args.fault_s)
        elif fault == "pause":
            row = await probe(call, proxy.pause, proxy.resume, args.fault_s)
        else:
            row = await probe(call, proxy.cut, lambda: None, 0.0)
        proxy.resume()
        await close()
    return replace(row, store=store, fault=fault)


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load run (default 60)")
    parser.add_argument("--concurrency", default="50,150", help="comma-separated (default 50,150)")
    parser.add_argument("--fault-s", type=float, default=10.0, help="how long a pause or failover lasts")
    parser.add_argument("--only", choices=("load", "faults"), help="run only one half")
    parser.add_argument("--stores", default="sql-postgres,redis", help="load: which stores (default both)")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")


async def _main(args: argparse.Namespace) -> None:
    if args.only != "faults":
        print(LOAD_HEADER, flush=True)
        with fresh_database(args.postgres, "agentgw_bench") as database:
            for kind in args.stores.split(","):
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    async with load_store(kind.split("-")[0], args, database) as store:
                        print((await load(kind, store, concurrency, args.duration)).line(), flush=True)
    if args.only != "load":
        print(FAULT_HEADER, flush=True)
        for store in ("pg-audit", "pg-budget", "redis-budget"):
            for fault in ("pause", "cut") if store == "redis-budget" else ("failover", "pause", "cut"):
                print((await fault_run(store, fault, args)).line(), flush=True)


def main(args: argparse.Namespace) -> int:
    """`python -m bench stores`: the tables, printed as they come."""
    asyncio.run(_main(args))
    return 0
