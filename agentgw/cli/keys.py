"""`agentgw keys`: API keys for service accounts, and the secrets of the built-in authorization server.

agentgw keys create --subject client:ci-bot --role operator     # prints the key once
agentgw keys list | revoke ID
agentgw keys hash-password        # reads a password on stdin; prints the config's password_hash
agentgw keys hash-secret          # reads a client secret on stdin; prints client_secret_sha256
agentgw keys rotate-signing       # new signing key; the old ones stay published for a while
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pydantic import ValidationError

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys and authorization-server secrets")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key (shown once)")
    add_common_options(create)
    create.add_argument("--subject", required=True, help="client:<name> or user:<name>")
    create.add_argument("--role", action="append", default=[], help="a role (repeat)")
    create.add_argument("--scope", action="append", default=[], help="a scope (repeat)")
    create.add_argument("--note", default="")
    add_common_options(keys_sub.add_parser("list", help="list API keys (never their secrets)"))
    revoke = keys_sub.add_parser("revoke", help="revoke an API key")
    add_common_options(revoke)
    revoke.add_argument("id")
    keys_sub.add_parser("hash-password", help="hash a user's password (read from stdin) for the config")
    keys_sub.add_parser("hash-secret", help="hash a client secret (read from stdin) for the config")
    add_common_options(keys_sub.add_parser("rotate-signing", help="rotate the built-in server's signing key"))
    keys.set_defaults(func=_keys)


def _read_secret(prompt: str) -> str:
    value = getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not value:
        raise SystemExit("error: empty input")
    return value


def _keys(args: argparse.Namespace) -> int:
    from agentgw.oauth.server import hash_password, hash_secret

    if args.keys_command == "hash-password":
        print(hash_password(_read_secret("password: ")))
        return 0
    if args.keys_command == "hash-secret":
        print(hash_secret(_read_secret("client secret: ")))
        return 0
    settings = settings_from_args(args)
    if args.keys_command == "rotate-signing":
        from agentgw.identity import signing_keys

        keys = signing_keys(settings)
        print(f"new signing key {keys.rotate()} in {keys.path}")
        return 0

    from agentgw.oauth.apikeys import ApiKeyStore, NewApiKey
    from agentgw.storage import make_engine

    store = ApiKeyStore(make_engine(settings.database_url))
    if args.keys_command == "create":
        try:
            new = NewApiKey(subject=args.subject, roles=args.role, scopes=args.scope, note=args.note)
        except ValidationError as exc:
            for error in exc.errors():
                print(f"error: {error['msg']}", file=sys.stderr)
            return 2
        created = store.create(new)
        print(created.key)
        print(f"id {created.id}: {created.subject} {' '.join(created.roles)} (shown once)", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        for info in store.list():
            state = f"revoked {info.revoked:%Y-%m-%d}" if info.revoked else "live"
            print(f"{info.id}\t{info.subject}\t{','.join(info.roles)}\t{','.join(info.scopes)}\t{state}")
        return 0
    if not store.revoke(args.id):
        print(f"error: no API key {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0
