"""`agentgw registry list|show|add|remove`: upstream MCP servers, straight in the database.

A running gateway picks up the change within seconds (it polls the registry's version row)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    reg = sub.add_parser("registry", help="upstream MCP servers")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    listing = reg_sub.add_parser("list", help="list servers, each with what a check of its upstream found")
    add_common_options(listing)
    listing.add_argument("--no-check", action="store_true", help="do not connect to the upstreams")
    show = reg_sub.add_parser("show", help="show one server")
    add_common_options(show)
    show.add_argument("name")
    add = reg_sub.add_parser("add", help="add a server")
    add_common_options(add)
    add.add_argument("name")
    add.add_argument("--transport", default="streamable-http", choices=["streamable-http", "sse", "stdio"])
    add.add_argument("--url")
    add.add_argument("--command")
    add.add_argument("--arg", action="append", help="an argument of the stdio command (repeat)")
    add.add_argument("--timeout", type=float, default=30.0)
    add.add_argument("--no-verify", action="store_true", help="store it without checking that it answers MCP")
    remove = reg_sub.add_parser("remove", help="remove a server")
    add_common_options(remove)
    remove.add_argument("name")
    imp = reg_sub.add_parser(
        "import", help="add servers from server.json files or another registry's API (/v0.1/servers)"
    )
    add_common_options(imp)
    imp.add_argument("source", help="a server.json file, a folder of them, or a registry's base URL")
    imp.add_argument("--to-folder", type=Path, help="write server.json files here instead of the database")
    imp.add_argument("--replace", action="store_true", help="replace servers (or files) of the same name")
    imp.add_argument(
        "--allow-http",
        action="store_true",
        help="fetch a registry over plain http (address rules still apply)",
    )
    diff = reg_sub.add_parser(
        "diff", help="what changed in a server's quarantined or waiting tools, prompts, resource templates"
    )
    add_common_options(diff)
    diff.add_argument("name")
    approve = reg_sub.add_parser(
        "approve",
        help="approve a server's tools, prompts, resource templates as last seen (all waiting if none named)",
    )
    add_common_options(approve)
    approve.add_argument("name")
    approve.add_argument(
        "tools",
        nargs="*",
        help="names of tools, prompts or resource templates (default: every quarantined or waiting one)",
    )
    reg.set_defaults(func=_registry)


def _registry(args: argparse.Namespace) -> int:
    from agentgw.registry.folder import RegistryFolder
    from agentgw.registry.models import McpServerSpec
    from agentgw.registry.store import RegistryConflict, RegistryStore
    from agentgw.registry.verify import CHECK_TIMEOUT_S, check, check_all
    from agentgw.storage import create_db, make_engine

    settings = settings_from_args(args, demo=False)
    import agentgw.registry.pins  # noqa: F401  (registers its tables before create_db)

    engine = make_engine(settings.database_url)
    create_db(engine)
    admission = settings.admission()
    # The gateway's rules: a stored server they refuse is listed as failing, not served.
    store = RegistryStore(engine, lambda spec, from_config: admission.refusal(spec, from_config=from_config))
    if settings.config_file is not None:
        # The config file owns its declarations: the registry shows them as the gateway would.
        folder = settings.registry.folder
        in_folder = RegistryFolder(folder).load() if folder is not None else []
        store.sync_config([*settings.servers, *in_folder], settings.virtual_servers)
    else:
        # Without a file nothing is declared; rows a file owns stay as the gateway last wrote them.
        store.refresh(force=True)
    if args.registry_command in ("diff", "approve"):
        return _review(args, engine)
    if args.registry_command == "import":
        return _import(args, store, settings)
    if args.registry_command == "list":
        rows: list[tuple[str, ...]] = [
            (name, "?", "?", f"failing: {why}") for name, why in store.failing_servers().items()
        ]
        served = store.servers()
        health = {} if args.no_check else asyncio.run(check_all(served))
        quarantined = _quarantined(engine)
        for spec in store.all_servers():
            where = spec.url or " ".join([spec.command or "", *spec.args])
            problem = admission.problem(spec, from_config=store.owner(spec.name) == "config")
            state = "disabled" if not spec.enabled else f"failing: {problem}" if problem else "enabled"
            row: tuple[str, ...] = (spec.name, spec.transport, where, state)
            if spec.name in health:
                row += (f"upstream {health[spec.name].text()}",)
            if waiting := quarantined.get(spec.name):
                row += (f"waiting for approval: {', '.join(waiting)}",)
            rows.append(row)
        for row in sorted(rows):
            print("\t".join(row))
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
            if refused := admission.refusal(spec, from_config=False):
                print(f"error: {refused}", file=sys.stderr)
                return 2
            if not args.no_verify:
                # Checked before anything is stored: a dead URL is refused now, not found at the first call.
                verified = asyncio.run(check(spec, min(spec.timeout_s, CHECK_TIMEOUT_S)))
                if verified.ok is False:
                    print(
                        f"error: upstream {spec.name} {verified.text()} (--no-verify to add it anyway)",
                        file=sys.stderr,
                    )
                    return 1
                print(f"checked {spec.name}: {verified.text()}", file=sys.stderr)
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


def _import(args: argparse.Namespace, store: Any, settings: Any) -> int:
    from agentgw.fetch_guard import FetchGuard
    from agentgw.registry.folder import to_server_json
    from agentgw.registry.importer import from_path, from_registry
    from agentgw.registry.store import RegistryConflict

    source: str = args.source
    try:
        if source.startswith(("http://", "https://")):
            schemes = ("https", "http") if args.allow_http else ("https",)
            found = asyncio.run(from_registry(source, FetchGuard(settings.fetch_allow), schemes=schemes))
        else:
            found = from_path(Path(source))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    admission = settings.admission()
    failed = 0
    for item in found:
        spec = item.spec
        problem = item.problem
        if spec is not None and problem is None:
            problem = admission.refusal(spec, from_config=args.to_folder is not None)
        if spec is None or problem is not None:
            print(f"skipped {item.source}: {problem}", file=sys.stderr)
            failed += 1
            continue
        try:
            if args.to_folder is not None:
                target = args.to_folder / f"{spec.name}.json"
                if target.exists() and not args.replace:
                    raise RegistryConflict(f"{target} exists (--replace to overwrite it)")
                args.to_folder.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(to_server_json(spec, item.source), indent=2) + "\n")
            else:
                store.put_server(spec, replace=args.replace)
        except RegistryConflict as exc:
            print(f"skipped {item.source}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"imported {item.source} as {spec.name}")
    print(f"{len(found) - failed} imported, {failed} skipped", file=sys.stderr)
    return 1 if failed else 0


def _review(args: argparse.Namespace, engine: Any) -> int:
    import difflib
    import getpass

    from agentgw.registry.pins import Pins

    pins = Pins(engine)
    if args.registry_command == "approve":
        try:
            approved = pins.approve(args.name, args.tools, by=f"cli:{getpass.getuser()}")
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 1
        print(f"approved {', '.join(approved)}" if approved else "nothing to approve")
        return 0
    waiting = [p for p in pins.pins(args.name) if p.state != "approved"]
    for pin in waiting:
        what = "" if pin.kind == "tool" else "prompt " if pin.kind == "prompt" else "resource template "
        print(f"{pin.state}: {what}{pin.name!r} ({', '.join(pin.changes())})")
        # JSON with ASCII escapes: upstream text (a description) cannot drive the terminal.
        before = json.dumps(pin.approved, indent=2, sort_keys=True).splitlines() if pin.approved else []
        after = json.dumps(pin.seen, indent=2, sort_keys=True).splitlines()
        for line in difflib.unified_diff(before, after, "approved", "seen now", lineterm=""):
            print(line)
    if not waiting:
        print(f"nothing waiting on {args.name}")
    return 0


def _quarantined(engine: Any) -> dict[str, list[str]]:
    from agentgw.registry.pins import Pins

    out: dict[str, list[str]] = {}
    for pin in Pins(engine).waiting():
        out.setdefault(pin.server, []).append(f"{pin.kind} {pin.name!r}")
    return out
