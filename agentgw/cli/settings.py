"""Settings for commands: the config file, or with none the built-in demo."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agentgw.settings import Settings, load_settings

__all__ = ["DEMO_USERS", "add_common_options", "settings_from_args"]

DEMO_POLICY = Path(__file__).parent.parent / "demo" / "policy.csv"
# Who can log in to the demo at its sign-in page (the demo policy makes alice a developer and bob a
# reader). Fixed and printed at start: the demo is for trying the gateway on 127.0.0.1, never for use.
DEMO_USERS = {
    "alice": (
        "alice-demo",
        "scrypt$94b1fbe2328e291667ecd99a5dc3612f$a2f7e7672cb70eaca316a2b1b2043177d8fbd8ccf072cd1e363e926d47"
        "f6698338a85f27a324d1c54bf761861a76d92cf06285f43de4392cf604a6eb2cc54b96",
    ),
    "bob": (
        "bob-demo",
        "scrypt$8ea08c8a290a3b3acafa0d12d1a98f4c$3cac27eafd8461295fc0a8ea3f2064bbf3115252bf9f65eaf988a11f13"
        "5c424b70e420dabc54d98b91555d2b55af4a9a722a480019a5c4333e8b66ea0fb7770d",
    ),
}


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
        auth={"builtin": {"users": [{"name": n, "password_hash": h} for n, (_, h) in DEMO_USERS.items()]}},
        **overrides,
    )
