"""`python -m bench {load,upstream,floor,compare,stores,cluster,tokens,recovery,stages}`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import cluster, compare, floor, load, recovery, stages, stores, tokens, upstream


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    load_parser = sub.add_parser("load", help="send a fixed number of calls at a fixed concurrency")
    load.add_arguments(load_parser)
    up = sub.add_parser("upstream", help="run the fast fixture MCP upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--server", choices=upstream.SERVERS, default="uvicorn")
    bare = sub.add_parser("floor", help="run a bare forwarding proxy (no pipeline) to measure against")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--upstream", required=True, help="the upstream's base URL")
    cmp = sub.add_parser("compare", help="direct vs through the gateway, side by side")
    compare.add_arguments(cmp)
    store = sub.add_parser("stores", help="the shared stores under load and under faults (no gateway)")
    stores.add_arguments(store)
    nodes = sub.add_parser("cluster", help="direct, one node, three nodes behind nginx (PostgreSQL, Redis)")
    cluster.add_arguments(nodes)
    cache = sub.add_parser("tokens", help="the exchanged-token cache: per node vs shared in Redis")
    tokens.add_arguments(cache)
    heal = sub.add_parser("recovery", help="one node losing PostgreSQL or Redis: refusals and recovery")
    recovery.add_arguments(heal)
    own = sub.add_parser(
        "stages", help="each pipeline stage's own cost, one switched off at a time (in process)"
    )
    stages.add_arguments(own)
    args = parser.parse_args(argv)
    if args.command == "load":
        return load.main(args)
    if args.command == "upstream":
        upstream.serve(args.port, args.server)
        return 0
    if args.command == "floor":
        floor.serve(args.port, args.upstream)
        return 0
    if args.command == "stores":
        return stores.main(args)
    if args.command == "cluster":
        return cluster.main(args)
    if args.command == "tokens":
        return tokens.main(args)
    if args.command == "recovery":
        return recovery.main(args)
    if args.command == "stages":
        return stages.main(args)
    return compare.main(args)


if __name__ == "__main__":
    sys.exit(main())
