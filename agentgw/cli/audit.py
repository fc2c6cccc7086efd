"""`agentgw audit tail|query|export|verify|prune`: the audit log, read straight from its database.

Filters (all commands but verify and prune): --since/--until (ISO 8601 or an age: 15m, 2h, 7d),
--subject, --actor, --client, --protocol, --resource (trailing `*` for a prefix), --decision,
--run, --request, --event. Output: a table or JSON Lines; export also as OpenTelemetry log records.
`verify` exits 1 and names the first record that was edited, removed or inserted, holding the chains
to the checkpoints signed by the gateway's key (decision 0215; what that proves: docs/audit.md).

Records hold what callers chose, control characters included: everything printed goes through
`printable`, so that a value can neither add a line or a column to the table nor reach the terminal
as an escape sequence (JSON escapes only some of them: DEL, C1 and bidi controls it writes as they are).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import orjson

from agentgw.cli.settings import add_common_options, settings_from_args
from agentgw.records.audit import printable

__all__ = ["register"]

TABLE_COLUMNS = ("id", "time", "event", "decision", "subject", "action", "resource", "status", "run_id")
FOLLOW_POLL_S = 1.0


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="from this time (ISO 8601) or age (15m, 2h, 7d)")
    parser.add_argument("--until", help="before this time (ISO 8601) or age")
    parser.add_argument("--subject", help="principal subject, e.g. user:alice")
    parser.add_argument("--actor", help="an actor anywhere in the delegation chain")
    parser.add_argument("--client", help="OAuth client id")
    parser.add_argument("--protocol", choices=["mcp", "a2a", "llm"])
    parser.add_argument("--resource", help="policy object, e.g. mcp:github/create_issue or mcp:github/*")
    parser.add_argument("--decision", choices=["allowed", "denied", "error"])
    parser.add_argument("--run", help="agent run id")
    parser.add_argument("--request", help="request id")
    parser.add_argument("--event", choices=["decision", "outcome"])


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit log: tail, query, export, verify")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    tail = audit_sub.add_parser("tail", help="the newest records (and with --follow, new ones as they come)")
    add_common_options(tail)
    _add_filters(tail)
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many records (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument("--format", choices=["table", "jsonl"], default="table")
    q = audit_sub.add_parser("query", help="records matching the filters, oldest first")
    add_common_options(q)
    _add_filters(q)
    q.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    q.add_argument("--format", choices=["table", "jsonl"], default="table")
    export = audit_sub.add_parser("export", help="every record matching the filters, as JSON Lines")
    add_common_options(export)
    _add_filters(export)
    export.add_argument("--format", choices=["jsonl", "otel"], default="jsonl", help="otel: OTLP log records")
    export.add_argument("-o", "--output", type=Path, help="write to this file (default: standard output)")
    verify = audit_sub.add_parser(
        "verify", help="check the hash chains and their signed checkpoints; exit 1 at the first problem"
    )
    add_common_options(verify)
    verify.add_argument(
        "--sink",
        action="append",
        type=Path,
        default=[],
        help="a checkpoint sink file to read (repeatable; default: audit.checkpoints.sink)",
    )
    verify.add_argument(
        "--trust-key",
        action="append",
        default=[],
        help="a public key (base64) whose checkpoints count, besides the local key and trusted_keys",
    )
    prune = audit_sub.add_parser(
        "prune", help="delete records older than an age (keeps the chains verifiable)"
    )
    add_common_options(prune)
    prune.add_argument("--older-than", required=True, help="an age such as 90d")
    audit.set_defaults(func=_audit)


def _filters(args: argparse.Namespace) -> Any:
    from agentgw.storage.audit import AuditQuery, parse_time

    return AuditQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        subject=args.subject,
        actor=args.actor,
        client=args.client,
        protocol=args.protocol,
        resource=args.resource,
        decision=args.decision,
        run_id=args.run,
        request_id=args.request,
        event=args.event,
    )


def _cell(value: Any) -> str:
    return "-" if value is None else printable(str(value))


def _json_line(row: dict[str, Any]) -> str:
    return printable(orjson.dumps(row).decode(), in_json=True) + "\n"


def _print(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO, *, header: bool = True) -> None:
    if fmt == "jsonl":
        for row in rows:
            out.write(_json_line(row))
        return
    if header:
        out.write("\t".join(TABLE_COLUMNS) + "\n")
    for row in rows:
        shown = dict(row)
        if shown["status"] is None and shown.get("reason"):
            shown["status"] = shown["reason"]
        out.write("\t".join(_cell(shown[c]) for c in TABLE_COLUMNS) + "\n")
    out.flush()


def _audit(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from agentgw.storage import make_engine
    from agentgw.storage.audit import create_audit_tables

    settings = settings_from_args(args)
    engine = make_engine(settings.audit.database_url or settings.database_url)
    try:
        create_audit_tables(engine)
        return _run(args, engine, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: the audit log cannot be read: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _run(args: argparse.Namespace, engine: Any, settings: Any) -> int:
    from agentgw.identity import signing_key_path
    from agentgw.storage.audit import (
        checkpointer,
        iter_records,
        otel_record,
        parse_time,
        prune,
        public_text,
        query,
        trust,
        verify,
    )

    command = args.audit_command
    key_dir = signing_key_path(settings).parent  # the checkpoint key's default place, as the gateway's
    if command == "verify":
        held_to = trust(settings.audit.checkpoints, key_dir, sinks=args.sink, keys=args.trust_key)
        report = verify(engine, held_to)
        if report.problem is not None:
            print(f"FAILED: {printable(report.problem.message)}", file=sys.stderr)
            print(f"checked {report.records} records in {report.chains} chains before it", file=sys.stderr)
            return 1
        print(f"ok: {report.records} records in {report.chains} chains verify")
        sinks = ", ".join(str(path) for path in held_to.sinks)
        keys = ", ".join(f"{kid} = {public_text(key)}" for kid, key in held_to.keys.items()) or "none"
        print(f"checked {report.checkpoints} checkpoint signatures (sinks {sinks}; public keys {keys})")
        if report.unproven:
            print(f"{report.unproven} records are newer than their chain's last checkpoint: not covered yet")
        if report.pending:
            print(f"{report.pending} records are only in the journal so far")
        return 0
    if command == "prune":
        signer = checkpointer(settings.audit.checkpoints, key_dir)
        try:
            removed = prune(engine, parse_time(args.older_than), signer)
        finally:
            signer.close()
        print(f"removed {removed} records")
        return 0
    filters = _filters(args)
    if command == "query":
        _print(query(engine, filters, limit=args.limit), args.format, sys.stdout)
        return 0
    if command == "export":
        out = args.output.open("w") if args.output else sys.stdout
        try:
            for row in iter_records(engine, filters):
                out.write(_json_line(otel_record(row) if args.format == "otel" else row))
        finally:
            if args.output:
                out.close()
        return 0
    rows = list(reversed(query(engine, filters, limit=args.lines, newest_first=True)))
    _print(rows, args.format, sys.stdout)
    if not args.follow:
        return 0
    last = rows[-1]["id"] if rows else _newest_id(engine)
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            new = query(engine, filters, limit=1000, after_id=last)
            if new:
                _print(new, args.format, sys.stdout, header=False)
                last = new[-1]["id"]
    except KeyboardInterrupt:
        return 0


def _newest_id(engine: Any) -> int:
    from agentgw.storage.audit import AuditQuery, query

    newest = query(engine, AuditQuery(), limit=1, newest_first=True)
    return int(newest[0]["id"]) if newest else 0
