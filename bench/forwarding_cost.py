"""What forwarding a bridged session's request to the node that holds it costs.

    python -m bench.forwarding_cost            # 3 rounds of 200 calls each way, alternating

Two `agentgw serve` nodes on loopback share Redis; one bridged session is opened on node A (`/mcp`,
the 2025-11-25 fixture upstream behind it). Each round sends sequential `tools/call`s of that session
to A (its owner) and then to B (which forwards them to A), and prints the median and 95th percentile
of each: the difference is the hop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from conformance.fixtures.launch import start_upstream_sync
from tests.support.gateway import run_gateway
from tests.support.mcp import LEGACY, LEGACY_INIT

__all__ = ["main"]

REDIS = "redis://127.0.0.1:6379/0"
PUBLIC = "http://127.0.0.1:9"  # the nodes' shared public URL (token audiences); nothing listens there


def _session(node: str, authorization: str) -> dict[str, str]:
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": LEGACY,
        "authorization": authorization,
    }
    started = httpx.post(f"{node}/mcp", json=LEGACY_INIT, headers=headers, timeout=10)
    started.raise_for_status()
    headers["mcp-session-id"] = started.headers["mcp-session-id"]
    ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    httpx.post(f"{node}/mcp", json=ready, headers=headers, timeout=10).raise_for_status()
    return headers


def _round(client: httpx.Client, node: str, headers: dict[str, str], calls: int) -> tuple[float, float]:
    times = []
    for i in range(calls):
        body = {
            "jsonrpc": "2.0",
            "id": i + 2,
            "method": "tools/call",
            "params": {"name": "legacy__echo", "arguments": {"text": str(i)}},
        }
        started = time.perf_counter()
        client.post(f"{node}/mcp", json=body, headers=headers).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forwarding_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with start_upstream_sync("legacy") as upstream, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = root / "keys" / "oauth-keys.json"
        config = {
            "public_url": PUBLIC,
            "redis_url": REDIS,
            "auth": {"builtin": {"enabled": True, "signing_key": str(keys)}},
            "servers": [{"name": "legacy", "url": f"{upstream}/mcp"}],
            "policy": {"rules": ["p, user:bench, mcp:legacy/*, *, allow"]},
        }
        for name in ("a", "b"):
            (root / name).mkdir()
        (root / "keys").mkdir(mode=0o700)
        with run_gateway(root / "a", config) as a, run_gateway(root / "b", config) as b:
            token, _ = mint_token(
                SigningKeys(keys), PUBLIC, subject="bench", audience=f"{PUBLIC}/mcp", client_id="bench"
            )
            headers = _session(a.url, f"Bearer {token}")
            print(f"{'path':<10} {'calls':>5} {'p50 ms':>7} {'p95 ms':>7}")
            with httpx.Client(timeout=10) as client:
                _round(client, a.url, headers, 50)  # warm both paths first
                _round(client, b.url, headers, 50)
                for _ in range(args.rounds):
                    for label, node in (("owner", a.url), ("forwarded", b.url)):
                        p50, p95 = _round(client, node, headers, args.calls)
                        print(f"{label:<10} {args.calls:>5} {p50:>7.2f} {p95:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
