"""`agentgw policy ...`: policy tooling for security teams, no Python needed.

    agentgw policy check user:alice mcp:github/create_issue call --role dev   # decision + deciding rule
    agentgw policy explain user:alice mcp:github/create_issue call            # ... and why, in words
    agentgw policy who-can mcp:github/delete_repo call                        # principals and roles
    agentgw policy what-can user:alice                                        # objects and actions
    agentgw policy replay --policy candidate/ --since 7d                      # what a change would do
    agentgw policy add "p, role:dev, mcp:github/*, call"                      # edit the policy source
    agentgw policy remove "p, role:dev, mcp:github/*, call"
    agentgw policy test policies/tests/                                       # YAML cases; 1 on a mismatch
    agentgw policy lint --policy agentgw/demo/policy.csv                      # rules that can never match

Without `--policy` the commands use the policy of the config (`--config`, `$AGENTGW_CONFIG`).
`who-can` and `what-can` read the rules the way agentgw's model decides them
(agentgw/policies/model.conf, decision 0002): roles through `g` rules, objects through a trailing
`*`, and a deny beats any allow.
A test file names its policy files relative to itself:

    policy: ../prod.csv            # or a list of files
    cases:
      - {subject: user:alice, roles: [security], object: admin:policies, action: write, expect: allow}
      - {subject: user:bob, object: mcp:github/delete_repo, action: call, expect: deny,
         rule: "p, *, mcp:github/delete_*, *, deny"}   # optional: the rule that must decide

One module, though long: `agentgw policy`'s subcommands are each small and share the loading,
matching and printing helpers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from agentgw.cli.settings import add_common_options, settings_from_args
from agentgw.filters.authorize import (
    DEFAULT_DENY,
    CasbinAuthorizer,
    PolicyError,
    Rule,
    object_match,
    parse_rule,
    read_rules,
)
from agentgw.filters.policy_review import (
    OBJECT_ACTIONS,
    REQUEST_ACTIONS,
    SUBJECT_PREFIXES,
    Change,
    Finding,
    lint,
    replay,
)
from agentgw.records.audit import printable
from agentgw.settings import PACKAGE_POLICIES

__all__ = ["Change", "Finding", "Grant", "lint", "register", "replay", "run_tests", "what_can", "who_can"]


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="check, test and lint Casbin policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)

    check = policy_sub.add_parser(
        "check", help="print the decision for one request and the rule that decided"
    )
    _policy_options(check)
    check.add_argument("subject", help="user:alice, client:ci-bot, anonymous, ...")
    check.add_argument("object", help="mcp:<server>/<tool>, admin:<area>, ...")
    check.add_argument("action", help="list, call, read, send, write")
    check.add_argument("--role", action="append", default=[], help="a role the token carries (repeat)")
    check.add_argument("--actor", action="append", default=[], help="a delegation actor, current first")

    test = policy_sub.add_parser("test", help="run YAML test cases; exit 1 on any mismatch")
    add_common_options(test)
    test.add_argument("paths", nargs="+", type=Path, help="YAML files or directories of them")

    lint_cmd = policy_sub.add_parser("lint", help="flag rules that can never match and roles never granted")
    _policy_options(lint_cmd)

    explain = policy_sub.add_parser(
        "explain", help="the decision for one request, the rules that apply and the model's matcher in words"
    )
    _policy_options(explain)
    explain.add_argument("subject", help="user:alice, client:ci-bot, role:dev, anonymous")
    explain.add_argument("object", help="mcp:<server>/<tool>, a2a:<agent>/<skill>, llm:<model>, admin:<area>")
    explain.add_argument("action", help="list, call, read, send, write")
    explain.add_argument("--role", action="append", default=[], help="a role the token carries (repeat)")
    explain.add_argument("--actor", action="append", default=[], help="a delegation actor, current first")

    who = policy_sub.add_parser(
        "who-can", aliases=["who"], help="the principals and roles a rule lets reach an object"
    )
    _policy_options(who)
    who.add_argument("object", help="an object, or a pattern ending in * (mcp:github/*)")
    who.add_argument("action", nargs="?", help="list, call, read, send, write (default: any)")

    what = policy_sub.add_parser("what-can", help="the objects and actions a subject's rules reach")
    _policy_options(what)
    what.add_argument("subject", help="user:alice, client:ci-bot, role:dev, anonymous")
    what.add_argument("--role", action="append", default=[], help="a role the token carries (repeat)")

    replay_cmd = policy_sub.add_parser(
        "replay",
        help="decide the audit log's recorded calls with a candidate policy; list what would change",
    )
    add_common_options(replay_cmd)
    replay_cmd.add_argument(
        "--policy",
        type=Path,
        required=True,
        help="a directory with model.conf and policy.csv, or a policy CSV file (with the config's model)",
    )
    replay_cmd.add_argument("--model", type=Path, help="the model for a CSV file (default: the config's)")
    replay_cmd.add_argument("--since", default="7d", help="ISO 8601 time or age (15m, 2h, 7d; default 7d)")
    replay_cmd.add_argument(
        "--allow-widening", action="store_true", help="exit 0 even if a denied call would be allowed"
    )

    for name, verb in (("add", "append rules to"), ("remove", "remove rules from")):
        edit = policy_sub.add_parser(
            name, help=f"{verb} the policy source (the policy file, or the database with policy.database)"
        )
        add_common_options(edit)
        edit.add_argument("rules", nargs="+", metavar="RULE", help='a policy line: "p, sub, obj, act[, eft]"')
        edit.add_argument("--policy", type=Path, help="edit this policy CSV file (default: the config's)")
        edit.add_argument(
            "--model", type=Path, help="the Casbin model to validate with (default: the config's)"
        )
    policy.set_defaults(func=_policy)


def _policy_options(parser: argparse.ArgumentParser) -> None:
    add_common_options(parser)
    parser.add_argument(
        "--policy", action="append", type=Path, help="policy CSV file (repeat; default: the config's)"
    )
    parser.add_argument("--model", type=Path, help="Casbin model (default: the packaged model.conf)")


def _authorizer(files: Sequence[Path], model: Path | None) -> CasbinAuthorizer:
    rules = [rule for path in files for rule in read_rules(path)]
    return CasbinAuthorizer(model or PACKAGE_POLICIES / "model.conf", None, rules, allow_empty=True)


def _configured(args: argparse.Namespace) -> CasbinAuthorizer:
    if args.policy:
        return _authorizer(args.policy, args.model)
    settings = settings_from_args(args)
    database = None
    if settings.policy.database:
        from agentgw.storage import make_engine

        database = make_engine(settings.database_url)
    return CasbinAuthorizer(
        args.model or settings.policy.model,
        settings.policy.file,
        settings.policy.rules,
        allow_empty=True,
        database=database,
    )


def _policy(args: argparse.Namespace) -> int:
    commands = {
        "check": _check,
        "explain": _explain,
        "who-can": _who_can,
        "who": _who_can,
        "what-can": _what_can,
        "replay": _replay,
        "add": _edit,
        "remove": _edit,
    }
    try:
        if args.policy_command in commands:
            return commands[args.policy_command](args)
        if args.policy_command == "test":
            failures = run_tests(args.paths)
            return 1 if failures else 0
        findings = lint(_configured(args).rules)
    except PolicyError as exc:
        print(f"error: {printable(exc.message)}", file=sys.stderr)
        return 2
    for finding in findings:
        print(finding)
    print(f"{len(findings)} finding(s)", file=sys.stderr)
    return 1 if findings else 0


def _check(args: argparse.Namespace) -> int:
    authorizer = _configured(args)
    roles = [r if r.startswith("role:") else f"role:{r}" for r in args.role]
    decision = authorizer.explain(args.subject, roles, args.actor, args.object, args.action)
    print("allow" if decision.allowed else "deny")
    print(f"  decided by: {decision.rule}" if decision.rule else "  no rule matched: denied by default")
    return 0 if decision.allowed else 1


# --- test ---


@dataclass(frozen=True, slots=True)
class _Case:
    subject: str
    object: str
    action: str
    expect: str
    roles: tuple[str, ...] = ()
    actors: tuple[str, ...] = ()
    rule: str | None = None
    name: str | None = None


def _case(raw: Any, where: str) -> _Case:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a case is a mapping")
    unknown = set(raw) - {"subject", "object", "action", "expect", "roles", "actors", "rule", "name"}
    missing = {"subject", "object", "action", "expect"} - set(raw)
    if unknown or missing:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if raw["expect"] not in ("allow", "deny"):
        raise PolicyError(f"{where}: expect must be allow or deny")
    roles = tuple(r if str(r).startswith("role:") else f"role:{r}" for r in raw.get("roles") or ())
    return _Case(
        str(raw["subject"]),
        str(raw["object"]),
        str(raw["action"]),
        raw["expect"],
        roles,
        tuple(str(a) for a in raw.get("actors") or ()),
        raw.get("rule"),
        raw.get("name"),
    )


def _test_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def run_tests(paths: Sequence[Path]) -> int:
    """Run every case in the YAML files under `paths`; print each failure; return how many failed.

    Raises:
        PolicyError: a test file or a policy it names is unreadable or malformed.
    """
    failures = total = 0
    files = _test_files(paths)
    if not files:
        raise PolicyError(f"no YAML test files under {', '.join(map(str, paths))}")
    for path in files:
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PolicyError(f"cannot read {path}: {exc}") from exc
        if not isinstance(spec, dict) or "policy" not in spec or not isinstance(spec.get("cases"), list):
            raise PolicyError(f"{path}: want a mapping with `policy` and a list of `cases`")
        names = spec["policy"] if isinstance(spec["policy"], list) else [spec["policy"]]
        model = path.parent / spec["model"] if spec.get("model") else None
        authorizer = _authorizer([path.parent / str(n) for n in names], model)
        for number, raw in enumerate(spec["cases"], 1):
            case = _case(raw, f"{path} case {number}")
            total += 1
            decision = authorizer.explain(case.subject, case.roles, case.actors, case.object, case.action)
            got = "allow" if decision.allowed else "deny"
            problem = None
            if got != case.expect:
                problem = f"expected {case.expect}, got {got} (rule: {decision.rule or 'none matched'})"
            elif case.rule is not None and decision.rule != case.rule:
                problem = f"{got} as expected, but decided by {decision.rule!r}, not {case.rule!r}"
            if problem:
                failures += 1
                label = case.name or f"{case.subject} {case.action} {case.object}"
                print(f"FAIL {path} case {number} ({label}): {problem}")
    print(f"{total - failures} passed, {failures} failed", file=sys.stderr)
    return failures


# --- the shapes of what is asked ---

SUBJECT_SHAPES = "user:<name>, client:<id>, role:<name> or anonymous"


def _subject(text: str) -> str:
    if text != "anonymous" and not (text.startswith(SUBJECT_PREFIXES) and text.split(":", 1)[1]):
        raise PolicyError(f"unknown subject '{text}': use {SUBJECT_SHAPES}")
    return text


def _object(text: str, *, pattern: bool = False) -> str:
    kind = next((k for k in OBJECT_ACTIONS if text.startswith(k)), None)
    if kind is None or text == kind:
        raise PolicyError(f"unknown object '{text}': use mcp:, a2a:, llm: or admin: and a name")
    if not pattern and text.endswith("*"):
        raise PolicyError(f"'{text}' is a pattern: ask about one object")
    return text


def _action(text: str) -> str:
    if text not in REQUEST_ACTIONS:
        raise PolicyError(f"unknown action '{text}': use one of {', '.join(REQUEST_ACTIONS)}")
    return text


def _roles(values: Sequence[str]) -> list[str]:
    return [r if r.startswith("role:") else f"role:{r}" for r in values]


# --- who-can and what-can: the rules read the way the model decides them ---


@dataclass(frozen=True, slots=True)
class Grant:
    """A rule that reaches `subject`, held through the roles in `via` (empty: it names `subject`)."""

    subject: str
    via: tuple[str, ...]
    rule: Rule
    denied_by: Rule | None = None  # an allow that a deny for the same subject overrides
    except_for: tuple[Rule, ...] = ()  # denies that override a part of the allow

    @property
    def effect(self) -> str:
        return self.rule.fields[3]


def _reach(rules: Sequence[Rule], start: str, *, upwards: bool) -> dict[str, tuple[str, ...]]:
    """Who `start` reaches through `g` rules, each with the roles in between (`start` excluded).

    Upwards: the roles `start` holds, each with the roles it is held through, `start`'s side first.
    Downwards: the members of the role `start`, each with the roles from it up to `start`.
    """
    links: dict[str, list[str]] = {}
    for rule in rules:
        if rule.kind == "g":
            member, role = rule.fields
            links.setdefault(member if upwards else role, []).append(role if upwards else member)
    found: dict[str, tuple[str, ...]] = {start: ()}
    frontier = [start]
    while frontier:
        name = frontier.pop(0)
        for nxt in links.get(name, ()):
            if nxt not in found:
                if upwards:
                    found[nxt] = () if name == start else (*found[name], name)
                else:
                    found[nxt] = (name, *found[name])
                frontier.append(nxt)
    del found[start]
    return found


def _narrower(a: str, b: str) -> str:
    """The smaller of two overlapping objects or patterns (they overlap, so one contains the other)."""
    return a if len(a.rstrip("*")) >= len(b.rstrip("*")) else b


def _overlaps(a: str, b: str) -> bool:
    """Whether some object matches both `a` and `b` (objects or patterns ending in `*`)."""
    if a.endswith("*") and b.endswith("*"):
        return a[:-1].startswith(b[:-1]) or b[:-1].startswith(a[:-1])
    if a.endswith("*"):
        return object_match(b, a)
    return object_match(a, b)


def _spans(pattern: str, space: str) -> bool:
    """Whether `pattern` matches every object of `space` (an object or a pattern)."""
    if space.endswith("*"):
        return pattern.endswith("*") and space[:-1].startswith(pattern[:-1])
    return object_match(space, pattern)


def _denials(
    allow: Rule, space: str, action: str, identities: Iterable[str], denies: Sequence[Rule]
) -> tuple[Rule | None, tuple[Rule, ...]]:
    """The deny that overrides `allow` on all of `space` for `action`, and those overriding a part."""
    held = {"*", *identities}
    whole: Rule | None = None
    parts: list[Rule] = []
    for deny in denies:
        d_sub, d_obj, d_act, _ = deny.fields
        if d_sub not in held or not _overlaps(d_obj, space) or (action != "*" and d_act not in ("*", action)):
            continue
        if _spans(d_obj, space) and d_act in ("*", action):
            whole = whole or deny
        else:
            parts.append(deny)
    return whole, tuple(parts)


def who_can(rules: Sequence[Rule], obj: str, action: str | None = None) -> list[Grant]:
    """Every subject that a rule on `obj` (an object, or a pattern ending in `*`) reaches for
    `action` (any when None), directly or as a member of a role, deny rules first."""
    p_rules = [r for r in rules if r.kind == "p" and _overlaps(obj, r.fields[1])]
    p_rules = [r for r in p_rules if action is None or r.fields[2] in ("*", action)]
    denies = [r for r in p_rules if r.fields[3] == "deny"]
    grants: list[Grant] = []
    for rule in sorted(p_rules, key=lambda r: r.fields[3] != "deny"):
        sub, rule_obj, act, eft = rule.fields
        reached = {sub: ()} | ({} if sub == "*" else _reach(rules, sub, upwards=False))
        for subject, via in reached.items():
            if eft == "deny":
                grants.append(Grant(subject, via, rule))
                continue
            identities = [subject, *_reach(rules, subject, upwards=True)]
            space = _narrower(obj, rule_obj)
            whole, parts = _denials(rule, space, action or act, identities, denies)
            grants.append(Grant(subject, via, rule, whole, parts))
    return grants


def what_can(rules: Sequence[Rule], subject: str, roles: Sequence[str] = ()) -> list[Grant]:
    """Every rule that reaches `subject` (holding the token `roles` too): through its own name, the
    roles it holds through `g` rules, or `*`; each allow with the denies that override it."""
    held: dict[str, tuple[str, ...]] = {subject: ()}
    for start in (subject, *roles):
        if start != subject:
            held.setdefault(start, ())
        for role, via in _reach(rules, start, upwards=True).items():
            held.setdefault(role, via if start == subject else (start, *via))
    held.setdefault("*", ())
    p_rules = [r for r in rules if r.kind == "p" and r.fields[0] in held]
    denies = [r for r in p_rules if r.fields[3] == "deny"]
    grants: list[Grant] = []
    for rule in sorted(p_rules, key=lambda r: r.fields[3] != "deny"):
        sub, obj, act, eft = rule.fields
        if eft == "deny":
            grants.append(Grant(sub, held[sub], rule))
            continue
        whole, parts = _denials(rule, obj, act, held, denies)
        grants.append(Grant(sub, held[sub], rule, whole, parts))
    return grants


def _via(grant: Grant) -> str:
    return f" (via {' > '.join(grant.via)})" if grant.via else ""


def _grant_line(grant: Grant, who: str) -> str:
    _, obj, act, eft = grant.rule.fields
    line = f"{eft:<5}  {who:<32}  {act:<5}  {obj}  [{grant.rule.text} at {grant.rule.source}]"
    if grant.denied_by is not None:
        line += f"  overridden by: {grant.denied_by.text} at {grant.denied_by.source}"
    for deny in grant.except_for:
        line += f"  except: {deny.text}"
    return printable(line)


def _who_can(args: argparse.Namespace) -> int:
    obj = _object(args.object, pattern=True)
    action = None if args.action is None else _action(args.action)
    grants = who_can(_configured(args).rules, obj, action)
    for grant in grants:
        who = "* (everyone)" if grant.subject == "*" else grant.subject + _via(grant)
        print(_grant_line(grant, who))
    allowed = sorted({g.subject for g in grants if g.effect == "allow" and g.denied_by is None})
    asked = f"{action or 'any action'} on {obj}"
    print(printable(f"allowed {asked}: {', '.join(allowed) or 'nobody'}"), file=sys.stderr)
    return 0


def _what_can(args: argparse.Namespace) -> int:
    subject = _subject(args.subject)
    grants = what_can(_configured(args).rules, subject, _roles(args.role))
    for grant in grants:
        who = "* (everyone)" if grant.subject == "*" else grant.subject + _via(grant)
        print(_grant_line(grant, who))
    count = sum(g.effect == "allow" and g.denied_by is None for g in grants)
    print(
        printable(f"{subject}: {count} allowing rule(s), {len(grants) - count} denying or overridden"),
        file=sys.stderr,
    )
    return 0


# --- explain ---

_MATCHER_WORDS = (
    "a rule applies when its subject is * or the subject or a role the subject holds (through g rules, "
    "or carried by its token), its object is the object or a pattern ending in * that the object starts "
    "with, and its action is * or the action"
)
_EFFECT_WORDS = (
    "allowed when some rule that applies allows and none denies: a deny beats every allow, and nothing "
    "is allowed that no rule allows (default deny)"
)
_DELEGATION_WORDS = (
    "a delegated call is decided for the subject and for the current actor: both must be allowed"
)


def _model_lines(model: Path) -> dict[str, str]:
    try:
        text = model.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the model {model}: {exc}") from exc
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"(?m)^\s*([em])\s*=(.*)$", text)}


def _explain(args: argparse.Namespace) -> int:
    subject, obj, action = _subject(args.subject), _object(args.object), _action(args.action)
    authorizer = _configured(args)
    roles = _roles(args.role)
    decision = authorizer.explain(subject, roles, args.actor, obj, action)
    print("allow" if decision.allowed else "deny")
    print(printable(f"  decided by: {decision.rule or DEFAULT_DENY + ' (no rule matched)'}"))
    lines = _model_lines(authorizer.model)
    ours = _model_lines(PACKAGE_POLICIES / "model.conf")
    print(printable(f"  matcher: {lines.get('m', '?')}"))
    print(printable(f"  effect:  {lines.get('e', '?')}"))
    if lines == ours:
        print(f"  in words: {_MATCHER_WORDS}; {_EFFECT_WORDS}; {_DELEGATION_WORDS}.")
    else:
        print("  in words: a custom model: read its matcher and effect above")
    print("  rules that apply:")
    shown: set[Rule] = set()
    for who in (subject, *args.actor[:1]):
        for grant in what_can(authorizer.rules, who, roles if who == subject else ()):
            _, rule_obj, act, eft = grant.rule.fields
            if grant.rule in shown or not (object_match(obj, rule_obj) and act in ("*", action)):
                continue
            shown.add(grant.rule)
            label = "* (everyone)" if grant.subject == "*" else grant.subject + _via(grant)
            if who != subject and grant.subject != "*":
                label += f", for the actor {who}"
            print(printable(f"    {eft:<5}  {label}  [{grant.rule.text} at {grant.rule.source}]"))
    return 0 if decision.allowed else 1


# --- replay ---


def _candidate(path: Path, model: Path) -> CasbinAuthorizer:
    if path.is_dir():
        model, path = path / "model.conf", path / "policy.csv"
        for needed in (model, path):
            if not needed.is_file():
                raise PolicyError(
                    f"the candidate directory has no {needed.name}: it needs model.conf and policy.csv"
                )
    elif not path.is_file():
        raise PolicyError(f"no candidate policy at {path}")
    return CasbinAuthorizer(model, path, [], allow_empty=True)


def _replay(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from agentgw.storage import make_engine
    from agentgw.storage.audit import AuditQuery, create_audit_tables, iter_records, parse_time

    settings = settings_from_args(args)
    candidate = _candidate(args.policy, args.model or settings.policy.model)
    try:
        since = parse_time(args.since)
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc
    engine = make_engine(settings.audit.database_url or settings.database_url)
    try:
        create_audit_tables(engine)
        replayed, changes = replay(iter_records(engine, AuditQuery(since=since, event="decision")), candidate)
    except SQLAlchemyError as exc:
        raise PolicyError(f"the audit log cannot be read: {exc}") from exc
    finally:
        engine.dispose()
    for change in changes:
        r = change.record
        print(
            printable(
                f"{change.was} -> {change.now}  {r['time']}  {r['subject']}  {r['action']}  {r['resource']}"
                f"  was: {r['rule'] or DEFAULT_DENY}  now: {change.now_rule}  (request {r['request_id']})"
            )
        )
    widening = sum(c.widening for c in changes)
    print(
        f"{replayed} recorded decision(s) since {since} replayed: {len(changes)} would change "
        f"(allowed -> denied: {len(changes) - widening}, denied -> allowed: {widening})"
    )
    for title, key in (("by subject", "subject"), ("by object", "resource")):
        counts = Counter((c.record[key], c.was, c.now) for c in changes)
        if counts:
            print(f"{title}:")
        for (name, was, now), count in sorted(counts.items()):
            print(printable(f"  {name}  {was} -> {now}: {count}"))
    if not replayed:
        print(
            f"note: the audit log holds no policy decision since {since}: nothing was replayed",
            file=sys.stderr,
        )
    if widening and not args.allow_widening:
        print(
            f"error: the candidate allows {widening} call(s) that were denied"
            " (pass --allow-widening to accept)",
            file=sys.stderr,
        )
        return 1
    return 0


# --- add and remove ---

# Lint findings that do not make a rule dead: a role may come from tokens, a g rule may come first.
_ADVISORY = ("is granted by no g rule", "grants nothing")


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: the gateway reads either the old file or the new one.

    Raises:
        PolicyError: the file could not be written (it is left as it was).
    """
    try:
        mode = path.stat().st_mode & 0o7777
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise PolicyError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as exc:
        os.unlink(temp)
        if isinstance(exc, OSError):
            raise PolicyError(f"cannot write {path}: {exc}") from exc
        raise


def _edit(args: argparse.Namespace) -> int:
    adding = args.policy_command == "add"
    given = [parse_rule(text, f"argument {n}") for n, text in enumerate(args.rules, 1)]
    for rule in given:
        if not all(field.isprintable() for field in rule.fields):
            raise PolicyError(f"{rule.source}: a field holds characters that are not printable")
    settings = None if args.policy else settings_from_args(args)
    model = args.model or (settings.policy.model if settings else PACKAGE_POLICIES / "model.conf")
    database = settings is not None and settings.policy.database
    path = args.policy or (None if settings is None else settings.policy.file)
    if database:
        authorizer = _configured(args)
        current = authorizer.rules
    elif path is None:
        raise PolicyError("the config names no policy file (policy.file) and policy.database is off")
    else:
        current = read_rules(path)
    same = {(r.kind, r.fields) for r in given}
    if adding:
        result = [*current, *given]
    else:
        # With the database on, only its rules can be removed here; the file's are edited in the file.
        editable = [r for r in current if r.source.startswith("database")] if database else current
        held = {(r.kind, r.fields) for r in editable}
        missing = [r.text for r in given if (r.kind, r.fields) not in held]
        if missing:
            raise PolicyError(f"no such rule to remove: {'; '.join(missing)}")
        result = [r for r in current if (r.kind, r.fields) not in same]
    # The checks of `policy lint`: a new rule that can never take effect is refused, the advice
    # (a role no g rule grants may come from tokens) is shown; the result must load.
    findings = [f for f in lint(result) if f.source.startswith("argument ")] if adding else []
    blocking = [f for f in findings if not any(a in f.problem for a in _ADVISORY)]
    if blocking:
        raise PolicyError("; ".join(str(f) for f in blocking))
    for finding in findings:
        print(printable(f"note: {finding}"), file=sys.stderr)
    allow_empty = settings.policy.allow_empty if settings else False
    CasbinAuthorizer(model, None, result, allow_empty=allow_empty)
    if database:
        for rule in given:
            if adding:
                authorizer.add_rule(rule.text)
            else:
                authorizer.remove_rule(rule.text)
        where = "the database"
    else:
        assert path is not None
        lines = path.read_text().splitlines()
        if adding:
            lines += [r.text for r in given]
        else:
            lines = [line for line in lines if not _is_one_of(line, same)]
        _write_atomically(path, "\n".join(lines) + "\n")
        where = str(path)
    verb = "added to" if adding else "removed from"
    for rule in given:
        print(printable(f"{rule.text}: {verb} {where}"))
    return 0


def _is_one_of(line: str, rules: set[tuple[Literal["p", "g"], tuple[str, ...]]]) -> bool:
    if not line.strip() or line.lstrip().startswith("#"):
        return False
    rule = parse_rule(line)
    return (rule.kind, rule.fields) in rules
