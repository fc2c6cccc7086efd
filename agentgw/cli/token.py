"""`agentgw token issue`: mint an access token from the built-in authorization server, for local use.

    agentgw token issue --subject alice --role security --resource http://127.0.0.1:8080/admin
    agentgw token issue --subject alice --scope tools.read            # audience: <base url>/mcp
    agentgw token issue --subject alice --resource http://127.0.0.1:8080  # every endpoint

The token is signed with the gateway's key file (so the gateway trusts it) and printed on stdout.
Its issuer and default audience are the gateway's base URL: `public_url`, else the URL the gateway
started on this data directory serves at (whatever `--port` it was given), else host and port.
A token is good at its audience and every path under it (docs/decisions/0100, 0109).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agentgw.cli.settings import add_common_options, settings_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    token = sub.add_parser("token", help="mint access tokens for local use")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed access token")
    add_common_options(issue)
    issue.add_argument("--subject", required=True, help="the user (alice) the token is for")
    issue.add_argument(
        "--client", help="client id (default: agentgw-cli); equal to --subject: a client token"
    )
    issue.add_argument("--scope", action="append", default=[], help="a scope (repeat, or space-separated)")
    issue.add_argument("--role", action="append", default=[], help="a role (repeat)")
    issue.add_argument(
        "--resource",
        action="append",
        default=[],
        help="audience URI: an endpoint (<base url>/v1, /a2a/<agent>, /admin) or the base URL for all "
        "(repeat; default: <base url>/mcp)",
    )
    issue.add_argument("--actor", help="delegation: the client acting for the subject (an `act` claim)")
    issue.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    from agentgw.identity import issuer_url, signing_keys
    from agentgw.oauth.server import mint_token

    settings = settings_from_args(args)
    if not settings.auth.builtin.enabled:
        print("error: the built-in authorization server is disabled (auth.builtin.enabled)", file=sys.stderr)
        return 2
    if args.ttl <= 0 or args.ttl > 86400:
        print("error: --ttl must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    subject = args.subject.removeprefix("user:")
    issuer = issuer_url(settings)
    audience = args.resource or [f"{issuer}/mcp"]
    token, _ = mint_token(
        signing_keys(settings),
        issuer,
        subject=subject,
        audience=audience,
        client_id=args.client or "agentgw-cli",
        scopes=[s for value in args.scope for s in value.split()],
        roles=args.role,
        act={"sub": args.actor} if args.actor else None,
        ttl_s=args.ttl,
    )
    print(token)
    print(f"token for {', '.join(audience)} (issuer {issuer})", file=sys.stderr)
    return 0
