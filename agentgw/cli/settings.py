"""Settings for commands: the config file, or with none the built-in demo."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agentgw.settings import Settings, load_settings

__all__ = ["add_common_options", "settings_from_args"]

DEMO_POLICY = Path(__file__).parent.parent / "demo" / "policy.csv"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML config file (default: $AGENTGW_CONFIG, else the demo)"
    )
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL (default: SQLite in the data directory, data_dir)"
    )


def settings_from_args(args: argparse.Namespace, *, demo: bool = True) -> Settings:
    """The settings a command runs with; with no config file anywhere, the demo's (if `demo`).

    Raises:
        ConfigError: the config file or environment is invalid.
    """
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "database_url")}
    if demo and args.config is None and "AGENTGW_CONFIG" not in os.environ:
        return _demo_settings(overrides)
    return load_settings(args.config, **overrides)


def _demo_settings(overrides: dict[str, object]) -> Settings:
    base = load_settings(None, **overrides)
    demo_url = f"http://{base.host}:{base.port}/_demo/mcp"
    return load_settings(
        None,
        demo=True,
        allow_anonymous=True,
        servers=[{"name": "demo", "url": demo_url}],
        policy={"file": str(DEMO_POLICY)},
        # An iteration budget the tour can run into: at most 10 tool calls per agent run.
        budgets={"rules": [{"name": "demo-run-calls", "per": "run", "calls": 10}]},
        **overrides,
    )
