"""The exchanged-token cache across nodes: token endpoint calls, and what a shared hit costs.

    python -m bench tokens [--calls 300] [--callers 10] [--nodes 3] [--lookups 2000] [--rounds 2]

Nodes here are credentials stages in one process (`Credentials`, as `agentgw serve` builds it), each
with its own memory cache, all asking one token service: the authlib STS fixture of the tests
(conformance/fixtures/sts.py, in-process over ASGI). With `shared`, every node's cache has Redis
behind it (`RedisTokenStore`, a key prefix of its own, deleted afterwards); without, each node is
alone, as before decision 0605.

Exchanges: `--calls` token-exchange calls from `--callers` callers, spread round robin over the
nodes, one after another (`sequential`) and all at once (`burst`: first calls race on every node).
Reported: requests to the token endpoint (exchanges, and the gateway's actor tokens).

Cost: `--lookups` lookups of one cached token in one node's cache: a memory hit, and a shared hit
(the node's memory emptied before each lookup, so Redis answers and the token is decrypted).
Rounds alternate the two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import httpx
import redis.asyncio

from agentgw.call import Call, Principal, Reply
from agentgw.filters.credentials import CacheKey, Credentials, IssuedCredential, MemoryTokenCache
from agentgw.oauth.exchange import TOKEN_EXCHANGE
from agentgw.registry.models import McpServerSpec
from agentgw.registry.secrets import Secrets, SecretSource
from agentgw.storage.token_cache import RedisTokenStore
from conformance.fixtures.sts import build_app as sts_app

__all__ = ["add_arguments", "main"]

STS = "http://127.0.0.1:9999"
UPSTREAM = "http://127.0.0.1:9/mcp"
CLIENT_SECRET = "bench-sts-secret"  # noqa: S105  # the fixture STS's client, in-process
CACHE_SECRET = "bench-token-cache-secret-0123456789abcdef"  # noqa: S105  # a throwaway prefix's key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--callers", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    os.environ["BENCH_STS_SECRET"] = CLIENT_SECRET
    print(f"exchanges: {args.calls} calls from {args.callers} callers over {args.nodes} nodes")
    print(f"{'cache':<8} {'calls':<11} {'exchanges':>9} {'actor tokens':>12}")
    for shared in (False, True):
        for burst in (False, True):
            exchanges, actors = await _exchanges(args, shared=shared, burst=burst)
            print(
                f"{'shared' if shared else 'per node':<8} {'burst' if burst else 'sequential':<11} "
                f"{exchanges:>9} {actors:>12}"
            )
    print(f"\ncost of one lookup ({args.lookups} lookups, mean and median, µs)")
    for round_ in range(args.rounds):
        for kind in ("memory", "shared"):
            mean, median = await _cost(args, kind)
            print(f"round {round_ + 1} {kind:<7} hit: mean {mean:7.1f}  median {median:7.1f}")
    return 0


def _spec() -> McpServerSpec:
    credential = {
        "mode": "token_exchange",
        "token_url": f"{STS}/token",
        "client": {"client_id": "gw", "secret": "sts-secret"},
        "scopes": ["pay.read"],
    }
    return McpServerSpec.model_validate({"name": "pay", "url": UPSTREAM, "credential": credential})


async def _terminal(call: Call) -> Reply:
    return Reply(payload="ok")


async def _exchanges(args: argparse.Namespace, *, shared: bool, burst: bool) -> tuple[int, int]:
    app = sts_app(
        9999,
        {"clients": [{"client_id": "gw", "secret": CLIENT_SECRET, "audiences": [UPSTREAM]}]},
    )
    prefix = f"agentgw-bench:{uuid.uuid4().hex}:"
    secrets = Secrets({"sts-secret": SecretSource(env="BENCH_STS_SECRET")})
    spec = _spec()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=STS) as http:
        tokens = [
            (
                await http.post(
                    "/_fixture/mint", json={"sub": f"user{n}", "aud": "http://gw/mcp", "scope": "pay.read"}
                )
            ).json()["access_token"]
            for n in range(args.callers)
        ]
        nodes = []
        for _ in range(args.nodes):
            store = RedisTokenStore(args.redis, CACHE_SECRET, prefix=prefix) if shared else None
            cache = MemoryTokenCache(shared=store)
            nodes.append(Credentials({"pay": spec}.get, http=http, cache=cache, secrets=secrets))
        # The stages must not close the STS client they share: close only their caches.
        calls = [
            _call(nodes[n % args.nodes], tokens[(n // args.nodes) % args.callers]) for n in range(args.calls)
        ]
        if burst:
            await asyncio.gather(*calls)
        else:
            for call in calls:
                await call
        records: list[dict[str, Any]] = (await http.get("/_fixture/requests")).json()
        for node in nodes:
            await node.cache.aclose()
    await _clean(args.redis, prefix)
    exchanges = sum(1 for r in records if r["grant_type"] == TOKEN_EXCHANGE)
    actors = sum(1 for r in records if r["grant_type"] == "client_credentials")
    return exchanges, actors


async def _call(stage: Credentials, token: str) -> None:
    call = Call(
        protocol="mcp",
        action="call",
        resource="mcp:pay/whoami",
        upstream="pay",
        method="tools/call",
        principal=Principal("user:x", credential=token),
    )
    await stage(call, _terminal)


async def _cost(args: argparse.Namespace, kind: str) -> tuple[float, float]:
    prefix = f"agentgw-bench:{uuid.uuid4().hex}:"
    store = RedisTokenStore(args.redis, CACHE_SECRET, prefix=prefix)
    key = CacheKey("caller", "pay", ("pay.read",), config="c")
    token = IssuedCredential("Bearer " + "t" * 800, time.monotonic() + 600, ("client:gw",))

    async def fetch() -> IssuedCredential:
        return token

    filler = MemoryTokenCache(shared=store)
    await filler.get(key, fetch)  # in Redis now
    cache = MemoryTokenCache(shared=store)
    await cache.get(key, fetch)
    samples = []
    for _ in range(args.lookups):
        if kind == "shared":
            cache._entries.clear()
        started = time.perf_counter()
        await cache.get(key, fetch)
        samples.append((time.perf_counter() - started) * 1e6)
    await filler.aclose()  # and the store they share
    await cache.aclose()
    await _clean(args.redis, prefix)
    return statistics.fmean(samples), statistics.median(samples)


async def _clean(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()
