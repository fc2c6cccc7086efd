"""`agentgw clients`: OAuth clients that registered themselves (RFC 7591) with the built-in server.

agentgw clients list             # id, name, redirect URIs, where from, live or revoked
agentgw clients revoke ID        # the client can no longer log in; its refresh tokens end
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    clients = sub.add_parser("clients", help="dynamically registered OAuth clients")
    clients_sub = clients.add_subparsers(dest="clients_command", required=True)
    add_common_options(clients_sub.add_parser("list", help="list registered clients"))
    revoke = clients_sub.add_parser("revoke", help="revoke a registered client and its logins")
    add_common_options(revoke)
    revoke.add_argument("client_id")
    clients.set_defaults(func=_clients)


def _clients(args: argparse.Namespace) -> int:
    from agentgw.identity import client_stores, revoke_registered_client
    from agentgw.storage import make_engine

    settings = settings_from_args(args)
    clients, refresh = client_stores(settings, make_engine(settings.database_url))
    if args.clients_command == "list":
        for info in clients.list():
            state = f"revoked {info.revoked:%Y-%m-%d}" if info.revoked else "live"
            # Names are the client's own choice: shown as data, one line each, control characters out.
            name = "".join(c for c in info.client_name or "-" if c.isprintable())
            print(
                f"{info.client_id}\t{name}\t{' '.join(info.redirect_uris)}\t{info.registered_from}\t{state}"
            )
        return 0
    if not revoke_registered_client(clients, refresh, args.client_id):
        print(f"error: no registered client {args.client_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.client_id}")
    return 0
