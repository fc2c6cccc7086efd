"""A hung PostgreSQL (audit log and SQL budget counters on it) makes the gateway refuse calls within
`database.statement_timeout_s`, and none of them reaches the upstream when the database answers
again; calls then work again without a restart. A node whose Redis (budget counters) is cut refuses
until Redis returns, then serves again by itself.

The stores are reached through proxies the tests break (`tests/support/proxy.py`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from tests.e2e.test_audit_crash import config, read, upstream_uris
from tests.support.gateway import run_gateway
from tests.support.proxy import TcpProxy

STATEMENT_TIMEOUT_S = 1.0
SLACK_S = 3.0
RECOVERY_BOUND_S = 30.0  # generous: the bound of a hang, not a measurement (bench/recovery.py measures)


async def test_calls_made_while_the_database_hangs_are_refused_in_time_and_never_forwarded(
    tmp_path: Path,
    modern_upstream: str,
    own_postgres: str,
    postgres_proxy: TcpProxy,
) -> None:
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:{postgres_proxy.port}/{own_postgres}"
    budgets = {"store": "sql", "rules": [{"name": "calls", "per": "subject", "window": "day", "calls": 1000}]}
    settings = config(
        modern_upstream,
        budgets=budgets,
        database={"statement_timeout_s": STATEMENT_TIMEOUT_S},
        # With a server database the key file would go to the working directory: keep it here.
        auth={"builtin": {"signing_key": str(tmp_path / "oauth-keys.json")}},
    )
    prefix = f"fixture://items/{uuid.uuid4().hex[:8]}-"
    with run_gateway(tmp_path, settings, database_url=database_url) as gw:
        async with httpx.AsyncClient(timeout=STATEMENT_TIMEOUT_S + SLACK_S) as http:
            assert "result" in (await read(http, gw.mcp("modern"), f"{prefix}before", 1)).json()

            postgres_proxy.pause()
            started = time.monotonic()
            refused = (await read(http, gw.mcp("modern"), f"{prefix}hung", 2)).json()
            assert time.monotonic() - started < STATEMENT_TIMEOUT_S + SLACK_S
            assert "unavailable" in refused["error"]["message"]
            assert "not forwarded" in refused["error"]["message"]

            postgres_proxy.resume()
            # The first call may still find the hung commit unfinished, and be refused at once.
            answers = [(await read(http, gw.mcp("modern"), f"{prefix}after", n)).json() for n in (3, 4, 5)]
            assert any("result" in answer for answer in answers), answers
    assert await upstream_uris(modern_upstream, prefix) == {f"{prefix}before", f"{prefix}after"}


async def test_a_node_refuses_while_redis_is_cut_and_serves_again_by_itself(
    tmp_path: Path, modern_upstream: str, redis_proxy: TcpProxy
) -> None:
    budgets = {
        "store": "redis",
        "redis_prefix": f"agentgw-test:{uuid.uuid4().hex}:",
        "rules": [{"name": "calls", "per": "subject", "window": "day", "calls": 1000}],
    }
    settings = config(
        modern_upstream,
        budgets=budgets,
        redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
        auth={"builtin": {"signing_key": str(tmp_path / "oauth-keys.json")}},
    )
    prefix = f"fixture://items/{uuid.uuid4().hex[:8]}-"
    with run_gateway(tmp_path, settings) as gw:
        async with httpx.AsyncClient(timeout=RECOVERY_BOUND_S) as http:
            assert "result" in (await read(http, gw.mcp("modern"), f"{prefix}before", 1)).json()

            redis_proxy.refuse()  # connections reset, new ones refused
            refused = (await read(http, gw.mcp("modern"), f"{prefix}cut", 2)).json()
            assert refused["error"]["message"] == "budget store unavailable: the call was not forwarded"

            redis_proxy.resume()
            # Nothing restarts the node or its pool: it must find Redis again by itself.
            deadline = time.monotonic() + RECOVERY_BOUND_S
            n = 3
            while "result" not in (
                answer := (await read(http, gw.mcp("modern"), f"{prefix}after", n)).json()
            ):
                assert time.monotonic() < deadline, (
                    f"still refused {RECOVERY_BOUND_S:g}s after Redis returned: {answer}"
                )
                n += 1
    assert await upstream_uris(modern_upstream, prefix) == {f"{prefix}before", f"{prefix}after"}
