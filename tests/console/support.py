"""A gateway with the console, its users and grants, for the console's HTTP and browser tests."""

from __future__ import annotations

from typing import Any

from agentgw.oauth.server import hash_password

PASSWORD = "correct horse battery"
# Each user holds the grants of one console page or none; `admin` holds them all.
USERS = ("auditor", "security", "operator", "nobody", "admin")
POLICY = [
    "p, role:auditor, admin:audit, read, allow",
    "p, role:security, admin:policies, *, allow",
    "p, role:operator, admin:registry, read, allow",
    "p, role:operator, admin:budgets, read, allow",
    "p, role:auditor, admin:audit, read, allow",
    "g, user:auditor, role:auditor",
    "g, user:security, role:security",
    "g, user:operator, role:operator",
    "g, user:admin, role:auditor",
    "g, user:admin, role:security",
    "g, user:admin, role:operator",
    # Approving pinned tools changes what callers reach: a write grant the operator lacks.
    "p, user:admin, admin:registry, write, allow",
    "p, anonymous, mcp:demo/*, *, allow",
    "p, anonymous, mcp:demo/delete_repo, call, deny",
]
# A caller's strings as they may reach the audit log: markup, a bidi override, a control character.
HOSTILE = "<script>alert('x')</script>\u202e<img src=x onerror=alert(1)>\x1b[31m"


def console_config(**extra: Any) -> dict[str, Any]:
    return {
        "allow_anonymous": True,
        "policy": {"rules": list(POLICY)},  # a copy: callers add rules of their own
        "auth": {
            "builtin": {"users": [{"name": u, "password_hash": hash_password(PASSWORD)} for u in USERS]},
        },
        "budgets": {"rules": [{"name": "per-run", "per": "run", "calls": 100}]},
        **extra,
    }
