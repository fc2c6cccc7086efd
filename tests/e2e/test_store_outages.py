"""A hung PostgreSQL (audit log and SQL budget counters on it) makes the gateway refuse calls within
`database.statement_timeout_s`, and none of them reaches the upstream when the database answers
again; calls then work again without a restart.

The database is reached through a proxy the test pauses (`tests/support/proxy.py`).
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
