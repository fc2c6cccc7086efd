"""`agentgw budget show SUBJECT | list`: the budgets in force, and what a principal has used of them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]

COLUMNS = ("budget", "per", "value", "resource", "window", "metric", "used", "limit", "resetsAt")


def register(sub: Any) -> None:
    budget = sub.add_parser("budget", help="budgets: what is in force and what is used")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_sub.add_parser("show", help="the budgets a principal is under, with current usage")
    add_common_options(show)
    show.add_argument("subject", help="e.g. user:alice")
    show.add_argument("--role", action="append", default=[], help="a role of the principal (repeat)")
    show.add_argument("--client", help="the principal's OAuth client id")
    show.add_argument("--run", help="also show this agent run's budgets")
    show.add_argument("--format", choices=["table", "json"], default="table")
    listing = budget_sub.add_parser("list", help="every budget, with its source (config or api)")
    add_common_options(listing)
    budget.set_defaults(func=_budget)


def _budget(args: argparse.Namespace) -> int:
    from agentgw.call import Principal
    from agentgw.errors import Unavailable
    from agentgw.filters.budget import effective_budgets
    from agentgw.records.budget import BudgetRule
    from agentgw.storage import make_engine
    from agentgw.storage.budget import budget_reader
    from agentgw.storage.budget.rules import BudgetRuleBook, BudgetRuleConflict

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    try:
        book = BudgetRuleBook(engine)
        book.refresh(force=True)
    except BudgetRuleConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # The config file owns its names even before a gateway has synced it into the database.
    rules: dict[str, tuple[BudgetRule, str]] = {r.name: (r, s) for r, s in book.rules() if s == "api"}
    rules |= {r.name: (r, "config") for r in settings.budgets.rules}
    if args.budget_command == "list":
        for rule, source in sorted(rules.values(), key=lambda item: item[0].name):
            print(f"{rule.name}\t{source}\t{rule.model_dump_json(exclude={'name'}, exclude_none=True)}")
        return 0
    principal = Principal(subject=args.subject, client_id=args.client, roles=tuple(args.role))

    async def report() -> list[dict[str, object]]:
        store = budget_reader(settings.budgets, engine, settings.redis_url)
        try:
            return await effective_budgets(
                [r for r, _ in rules.values()], store, principal, args.run, time.time()
            )
        finally:
            await store.aclose()

    try:
        lines = asyncio.run(report())
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(lines, indent=2))
        return 0
    if not lines:
        print(f"no budget applies to {args.subject}")
        return 0
    print("\t".join(COLUMNS))
    for line in lines:
        print("\t".join("-" if line[c] is None else str(line[c]) for c in COLUMNS))
    return 0
