"""Policy stage: Casbin decides whether a principal may do an action on an object; default deny.

pycasbin ships no type hints, so it appears only in this module, behind the `Authorizer` protocol.
Discovery uses the same decision as invocation: a listed item is kept only if `list` is allowed.

The policy is the union of three sources: a CSV file (GitOps; reloaded when it changes, and a
broken edit keeps the last good policy), inline rules from the config, and rules in the database
through Casbin's SQL adapter (edited through the admin API; other nodes notice a version row).
Decisions are cached and the cache is dropped on every policy change.

A caller acting through a delegation chain (`Principal.actors`) is allowed only what both the
subject and the current (outermost) actor are allowed: an agent never exceeds its user or itself.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
import casbin
from casbin_sqlalchemy_adapter import Adapter as SqlAdapter
from casbin_sqlalchemy_adapter.adapter import CasbinRule
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from agentgw.call import Call, Principal, Reply
from agentgw.errors import Forbidden, GatewayError
from agentgw.pipeline import CallNext

__all__ = [
    "ACTIONS",
    "DEFAULT_DENY",
    "Authorize",
    "Authorizer",
    "CasbinAuthorizer",
    "Decision",
    "PolicyError",
    "Rule",
    "object_match",
    "parse_rule",
    "read_rules",
]

log = logging.getLogger(__name__)

ACTIONS = ("list", "call", "read", "send", "write", "*")
MAX_CACHED_DECISIONS = 50_000
# Another node's policy edit is enforced here within this (plus one reload): a denial added on one
# node must hold on every node within a second. Each look reads one version row.
DB_POLL_S = 0.5
_FIELD = re.compile(r"^[^\s,\[\]()\"]+$")
# What the audit record names as the deciding rule when no rule matched.
DEFAULT_DENY = "default deny"
# A denial quotes the object the caller asked for, at most this long, so that an error stays small.
MAX_SHOWN_OBJECT = 200


class PolicyError(GatewayError):
    """The policy cannot be loaded (unreadable, malformed, or empty when that is not allowed)."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None  # the rule that decided, e.g. "p, role:dev, mcp:github/*, call, allow"


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy line: `p, sub, obj, act, eft` or `g, member, role`, and where it came from."""

    kind: Literal["p", "g"]
    fields: tuple[str, ...]
    source: str = "config"

    @property
    def text(self) -> str:
        return ", ".join((self.kind, *self.fields))


class Authorizer(Protocol):
    def decide(self, principal: Principal, obj: str, act: str) -> Decision: ...

    def refresh(self) -> None:
        """Pick up policy changes; cheap when nothing changed (called once per call)."""
        ...


def object_match(request_obj: str, pattern: str) -> bool:
    """Exact match, or prefix match when the pattern ends in `*` (the only special character)."""
    if pattern.endswith("*"):
        return request_obj.startswith(pattern[:-1])
    return request_obj == pattern


def parse_rule(line: str, source: str = "config") -> Rule:
    """Parse one policy line (an omitted effect means `allow`).

    Raises:
        PolicyError: not `p, sub, obj, act[, allow|deny]` or `g, member, role`, or a field with
            whitespace, a comma, brackets or quotes.
    """
    kind, *fields = [f.strip() for f in line.split(",")]
    if kind == "p":
        if len(fields) == 3:
            fields.append("allow")
        if len(fields) != 4 or fields[3] not in ("allow", "deny"):
            raise PolicyError(f"{source}: bad policy rule {line!r}: want p, sub, obj, act[, allow|deny]")
        if fields[2] not in ACTIONS:
            raise PolicyError(f"{source}: bad action in {line!r}: use one of {', '.join(ACTIONS)}")
    elif kind == "g":
        if len(fields) != 2:
            raise PolicyError(f"{source}: bad role rule {line!r}: want g, member, role")
    else:
        raise PolicyError(f"{source}: bad policy line {line!r}: it must start with p or g")
    for value in fields:
        if not _FIELD.fullmatch(value):
            raise PolicyError(f"{source}: bad field {value!r} in {line!r}")
    return Rule("p" if kind == "p" else "g", tuple(fields), source)


def read_rules(path: Path) -> list[Rule]:
    """The rules of a policy CSV file (blank lines and `#` comments skipped).

    Raises:
        PolicyError: the file is unreadable or a line is malformed.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    return [
        parse_rule(line, f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


class PolicyVersion(SQLModel, table=True):
    """Bumped on every database policy change, so other nodes reload."""

    __tablename__ = "policy_version"

    id: int = SQLField(default=1, primary_key=True)
    version: int = 0


Fingerprint = tuple[int, int, int] | None
# Never a file's fingerprint: makes the next look reload.
_UNSEEN: Fingerprint = (-2, -2, -2)


def _fingerprint(path: str | None) -> Fingerprint:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CasbinAuthorizer:
    """Casbin enforcer over a model file, a policy CSV file, inline rules and database rules.

    The decision cache is dropped whenever the policy changes; decisions are pure given the policy.
    """

    def __init__(
        self,
        model: Path,
        policy_file: Path | None,
        rules: Sequence[str | Rule],
        *,
        allow_empty: bool = False,
        database: Engine | None = None,
    ) -> None:
        self._model = model
        self._policy_file = policy_file
        # Inline rules: config lines, or parsed rules that keep their file and line (policy tooling).
        self._inline = [
            r if isinstance(r, Rule) else parse_rule(r, "config")
            for r in rules
            if isinstance(r, Rule) or (r.strip() and not r.lstrip().startswith("#"))
        ]
        self._allow_empty = allow_empty
        self._engine = database
        self._adapter: Any = None
        if database is not None:
            self._adapter = SqlAdapter(database)
            SQLModel.metadata.create_all(database, tables=[PolicyVersion.__table__])  # type: ignore[attr-defined]  # SQLModel declares tables dynamically
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, tuple[str, ...], tuple[str, ...], str, str], Decision] = {}
        # As strings: `refresh` stats them per call, and a `Path` converts itself on every stat.
        self._model_path = os.fspath(model)
        self._file_path = None if policy_file is None else os.fspath(policy_file)
        self._model_seen = _fingerprint(self._model_path)
        self._file_seen = _fingerprint(self._file_path)
        self._db_version = self._read_db_version()
        self._rules: list[Rule] = []
        self.last_error: str | None = None
        self.generation = 0
        # (enforcer, explainer), swapped as one object so a decision never mixes two policies.
        self._pair = self._load()

    @property
    def model(self) -> Path:
        """The Casbin model file the policy is decided with."""
        return self._model

    @property
    def database_enabled(self) -> bool:
        return self._adapter is not None

    @property
    def rules(self) -> list[Rule]:
        """Every rule in force, file rules first, then config, then database."""
        return list(self._rules)

    # --- loading ---
    def _db_rules(self) -> list[Rule]:
        if self._engine is None:
            return []
        with Session(self._engine) as session:
            rows = session.execute(select(CasbinRule).order_by(CasbinRule.id)).scalars().all()
        out = []
        for row in rows:
            values = [v for v in (row.v0, row.v1, row.v2, row.v3, row.v4, row.v5) if v is not None]
            out.append(parse_rule(", ".join([row.ptype, *values]), f"database:{row.id}"))
        return out

    def _read_db_version(self) -> int:
        if self._engine is None:
            return 0
        with Session(self._engine) as session:
            row = session.get(PolicyVersion, 1)
            return row.version if row is not None else 0

    def _load(self) -> tuple[Any, Any]:
        try:
            text = self._model.read_text()
            rules = [
                *(read_rules(self._policy_file) if self._policy_file else []),
                *self._inline,
                *self._db_rules(),
            ]
            # Casbin explains a denial but not an allow under "allow and no deny"; a twin enforcer
            # with an allow-only effect names the allowing rule for audit records.
            explain_text = re.sub(r"(?m)^e\s*=.*$", "e = some(where (p.eft == allow))", text)
            enforcers = []
            for model_text in (text, explain_text):
                model = casbin.model.Model()
                model.load_model_from_text(model_text)
                enforcer = casbin.Enforcer(model)
                enforcer.add_function("objectMatch", object_match)
                for rule in rules:
                    if rule.kind == "p":
                        enforcer.add_policy(*rule.fields)
                    else:
                        enforcer.add_grouping_policy(*rule.fields)
                enforcers.append(enforcer)
        except PolicyError:
            raise
        except Exception as exc:  # casbin raises bare exceptions for unreadable models
            raise PolicyError(f"cannot load policy: {exc}") from exc
        if not any(r.kind == "p" for r in rules) and not self._allow_empty:
            raise PolicyError("the policy is empty: every call would be denied (set policy.allow_empty)")
        self._rules = rules
        return enforcers[0], enforcers[1]

    def reload(self) -> None:
        """Load the policy again; on failure keep the last good one.

        Raises:
            PolicyError: the new policy is broken (the old one stays in force).
        """
        with self._lock:
            before = self._rules
            try:
                enforcers = self._load()
            except PolicyError:
                self._rules = before
                raise
            self._pair = enforcers
            self._cache = {}
            self.generation += 1
            self.last_error = None

    def refresh(self, *, model: bool = False) -> None:
        """Reload if the policy file changed since the last look (one `stat`: this runs per call, so
        a file edit takes effect at the next call); with `model`, the model file too (`watch` looks
        at it every `DB_POLL_S`: a model changes with a deployment, not between two calls)."""
        file_seen = _fingerprint(self._file_path)
        model_seen = _fingerprint(self._model_path) if model else self._model_seen
        if file_seen == self._file_seen and model_seen == self._model_seen:
            return
        self._file_seen, self._model_seen = file_seen, model_seen
        try:
            self.reload()
        except PolicyError as exc:
            self.last_error = exc.message
            log.error("policy reload refused, the last good policy stays in force: %s", exc.message)
            return
        # A file written in place may have changed again while it was read: look again next time.
        if _fingerprint(self._file_path) != file_seen:
            self._file_seen = _UNSEEN
        if model and _fingerprint(self._model_path) != model_seen:
            self._model_seen = _UNSEEN
        log.info("policy reloaded rules=%d", len(self._rules))

    def refresh_database(self) -> bool:
        """Reload if another node changed the database rules; True if it reloaded."""
        version = self._read_db_version()
        if version == self._db_version:
            return False
        self._db_version = version
        try:
            self.reload()
        except PolicyError as exc:
            self.last_error = exc.message
            log.error("policy reload refused, the last good policy stays in force: %s", exc.message)
            return False
        return True

    async def watch(self, interval_s: float = DB_POLL_S) -> None:
        """Poll the database policy version and the model and policy files until cancelled."""
        while True:
            await anyio.sleep(interval_s)
            try:
                self.refresh(model=True)
                if self._engine is not None:
                    await anyio.to_thread.run_sync(self.refresh_database)
            except Exception:
                log.exception("policy refresh failed; the last good policy stays in force")

    # --- database edits (admin API) ---
    def _bump(self) -> None:
        assert self._engine is not None
        with Session(self._engine) as session:
            row = session.get(PolicyVersion, 1) or PolicyVersion(id=1, version=0)
            row.version += 1
            session.add(row)
            session.commit()
            self._db_version = row.version

    def add_rule(self, line: str) -> Rule:
        """Add a rule to the database and put it in force at once.

        Raises:
            PolicyError: the rule is malformed, already present, the database source is off, or
                the reload failed (the rule is stored; the last good policy stays in force).
        """
        rule = parse_rule(line, "database")
        if self._adapter is None:
            raise PolicyError("policy rules are managed in files here: enable policy.database to edit them")
        if any(r.kind == rule.kind and r.fields == rule.fields for r in self._db_rules()):
            raise PolicyError(f"the rule {rule.text!r} is already in the database")
        self._adapter.add_policy(rule.kind, rule.kind, list(rule.fields))
        self._bump()
        self._reload_after_edit()
        return rule

    def remove_rule(self, line: str) -> bool:
        """Remove a database rule; False if the database holds no such rule.

        Raises:
            PolicyError: the rule is malformed, the database source is off, the removal would
                leave the policy empty, or the reload failed (the removal stands).
        """
        rule = parse_rule(line, "database")
        if self._adapter is None:
            raise PolicyError("policy rules are managed in files here: enable policy.database to edit them")
        rest = [r for r in self._rules if not (r.kind == rule.kind and r.fields == rule.fields)]
        if not any(r.kind == "p" for r in rest) and not self._allow_empty:
            raise PolicyError("removing this rule would leave the policy empty (set policy.allow_empty)")
        if not self._adapter.remove_policy(rule.kind, rule.kind, list(rule.fields)):
            return False
        self._bump()
        self._reload_after_edit()
        return True

    def _reload_after_edit(self) -> None:
        try:
            self.reload()
        except PolicyError as exc:
            # The database edit stands; another source (a broken file) keeps the old policy in force.
            self.last_error = exc.message
            raise PolicyError(f"the change is stored but the policy was not reloaded: {exc.message}") from exc

    # --- decisions ---
    def decide(self, principal: Principal, obj: str, act: str) -> Decision:
        key = (principal.subject, principal.roles, principal.actors[:1], obj, act)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self.explain(principal.subject, principal.roles, principal.actors[:1], obj, act)
        if len(self._cache) >= MAX_CACHED_DECISIONS:  # object names come from callers: stay bounded
            self._cache = {}
        self._cache[key] = decision
        return decision

    def explain(
        self, subject: str, roles: Sequence[str], actors: Sequence[str], obj: str, act: str
    ) -> Decision:
        """The decision for `subject` (with token `roles`) acting through `actors` (current first)."""
        decision = self._decide_as((subject, *roles), obj, act)
        if not decision.allowed or not actors:
            return decision
        # Delegation: the current actor must be allowed too; the stricter answer wins.
        as_actor = self._decide_as((actors[0],), obj, act)
        return as_actor if not as_actor.allowed else decision

    def _decide_as(self, identities: Sequence[str], obj: str, act: str) -> Decision:
        enforcer, explainer = self._pair
        allowed_as: str | None = None
        # Roles from the token are identities too; an explicit deny reached from any of them wins.
        for identity in identities:
            allowed, explain = enforcer.enforce_ex(identity, obj, act)
            if not allowed and explain:
                return Decision(False, "p, " + ", ".join(explain))
            if allowed and allowed_as is None:
                allowed_as = identity
        if allowed_as is None:
            return Decision(False, None)
        _, explain = explainer.enforce_ex(allowed_as, obj, act)
        return Decision(True, "p, " + ", ".join(explain) if explain else None)


class Authorize:
    """Refuses calls the policy does not allow; narrows discovery listings to what is allowed."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        principal = call.principal
        if principal is None:  # a pipeline built without the identity stage: refuse, never pass
            raise Forbidden("denied by policy: no principal")
        self._authorizer.refresh()
        if call.action == "session":
            return await call_next(call)
        if call.action == "list":
            reply = await call_next(call)
            if reply.listing is not None:
                decide = self._authorizer.decide
                reply.listing = [o for o in reply.listing if decide(principal, o, "list").allowed]
            return reply
        refused = call.resource
        decision = self._authorizer.decide(principal, refused, call.action)
        if decision.allowed:
            for obj in call.objects:
                decision_of_obj = self._authorizer.decide(principal, obj, call.action)
                if not decision_of_obj.allowed:
                    refused, decision = obj, decision_of_obj
                    break
        call.decided_by = decision.rule if decision.rule or decision.allowed else DEFAULT_DENY
        if not decision.allowed:
            # It names what the caller asked for, in the same words whether or not that exists, so
            # a denial says what was refused without revealing what is there.
            raise Forbidden(
                f"denied by policy: {_shown(principal.subject)} may not {call.action} {_shown(refused)}"
            )
        return await call_next(call)


def _shown(name: str) -> str:
    """`name` fit for an error message: characters that are not printable escaped, then capped."""
    if not name.isprintable():
        name = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)
    if len(name) > MAX_SHOWN_OBJECT:
        return f"{name[:MAX_SHOWN_OBJECT]}...[{len(name) - MAX_SHOWN_OBJECT} more]"
    return name
