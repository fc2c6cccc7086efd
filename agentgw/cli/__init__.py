"""`agentgw <command>`: the operator's command line. Each command lives in its own module with a
`register(subparsers)` function; add new commands to `COMMANDS`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agentgw import __version__
from agentgw.cli import audit, budget, clients, keys, policy, registry, serve, token
from agentgw.errors import ConfigError

__all__ = ["main"]

COMMANDS = (serve, registry, audit, budget, policy, token, keys, clients)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentgw", description="agentgw: a gateway for agent traffic")
    parser.add_argument("--version", action="version", version=f"agentgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a bad config)."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
