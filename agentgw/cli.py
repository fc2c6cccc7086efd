"""`agentgw serve | registry ...`: the operator's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from agentgw.settings import ConfigError, Settings, load_settings

__all__ = ["main"]

DEMO_POLICY = Path(__file__).parent / "demo" / "policy.csv"


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "database_url")}
    if args.config is None and "AGENTGW_CONFIG" not in __import__("os").environ:
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
        **overrides,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agentgw.app import create_app

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Decisions go to the audit log; casbin's and httpx's per-request lines would only repeat them.
    logging.getLogger("casbin").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    base = settings.base_url
    print(f"agentgw listening on {base}", flush=True)
    for spec in app.state.gateway.registry.servers():
        print(f"  MCP server {spec.name!r}: {base}/mcp/{spec.name}", flush=True)
    if settings.demo:
        print(
            "  demo mode: SQLite, the built-in demo upstream and demo policy; anonymous callers allowed",
            flush=True,
        )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from agentgw.storage import create_db, make_engine
    from registry.models import McpServerSpec
    from registry.store import RegistryConflict, RegistryStore

    settings = _settings(args)
    engine = make_engine(settings.database_url)
    create_db(engine)
    store = RegistryStore(engine)
    store.refresh(force=True)
    if args.registry_command == "list":
        for spec in store.all_servers():
            where = spec.url or " ".join([spec.command or "", *spec.args])
            state = "enabled" if spec.enabled else "disabled"
            print(f"{spec.name}\t{spec.transport}\t{where}\t{state}")
        return 0
    if args.registry_command == "show":
        found = next((s for s in store.all_servers() if s.name == args.name), None)
        if found is None:
            print(f"error: no server named {args.name!r}", file=sys.stderr)
            return 1
        print(json.dumps(found.model_dump(), indent=2))
        return 0
    if args.registry_command == "add":
        try:
            spec = McpServerSpec(
                name=args.name,
                transport=args.transport,
                url=args.url,
                command=args.command,
                args=args.arg or [],
                timeout_s=args.timeout,
            )
            store.put_server(spec)
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"]) or "server"
                print(f"error: {field}: {error['msg']}", file=sys.stderr)
            return 2
        except RegistryConflict as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"added {spec.name}")
        return 0
    try:
        removed = store.remove_server(args.name)
    except RegistryConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not removed:
        print(f"error: no server named {args.name!r}", file=sys.stderr)
        return 1
    print(f"removed {args.name}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentgw", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="YAML config file (default: $AGENTGW_CONFIG, else the demo)"
    )
    common.add_argument("--database-url", help="SQLAlchemy URL (default: sqlite:///agentgw.db)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.set_defaults(func=_serve)

    reg = sub.add_parser("registry", help="upstream MCP servers")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    reg_sub.add_parser("list", parents=[common], help="list servers")
    show = reg_sub.add_parser("show", parents=[common], help="show one server")
    show.add_argument("name")
    add = reg_sub.add_parser("add", parents=[common], help="add a server")
    add.add_argument("name")
    add.add_argument("--transport", default="streamable-http", choices=["streamable-http", "sse", "stdio"])
    add.add_argument("--url")
    add.add_argument("--command")
    add.add_argument("--arg", action="append", help="an argument of the stdio command (repeat)")
    add.add_argument("--timeout", type=float, default=30.0)
    remove = reg_sub.add_parser("remove", parents=[common], help="remove a server")
    remove.add_argument("name")
    reg.set_defaults(func=_registry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
