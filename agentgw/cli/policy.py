"""`agentgw policy check|test|lint`: policy tooling for security teams, no Python needed.

    agentgw policy check user:alice mcp:github/create_issue call --role dev   # decision + deciding rule
    agentgw policy test policies/tests/                                       # YAML cases; 1 on a mismatch
    agentgw policy lint --policy policies/demo.csv                            # rules that can never match

Without `--policy` the commands use the policy of the config (`--config`, `$AGENTGW_CONFIG`).
A test file names its policy files relative to itself:

    policy: ../demo.csv            # or a list of files
    cases:
      - {subject: user:alice, roles: [security], object: admin:policies, action: write, expect: allow}
      - {subject: user:bob, object: mcp:github/delete_repo, action: call, expect: deny,
         rule: "p, *, mcp:github/delete_*, *, deny"}   # optional: the rule that must decide
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agentgw.cli.settings import add_common_options, settings_from_args
from agentgw.filters.authorize import ACTIONS, CasbinAuthorizer, PolicyError, Rule, object_match, read_rules
from agentgw.settings import PACKAGE_POLICIES

__all__ = ["Finding", "lint", "register", "run_tests"]

ADMIN_AREAS = ("registry", "policies", "keys", "budgets", "audit", "metrics")
OBJECT_ACTIONS = {
    "mcp:": {"list", "call", "read"},
    "a2a:": {"list", "send", "call"},
    "llm:": {"list", "call"},
    "admin:": {"read", "write"},
}
SUBJECT_PREFIXES = ("user:", "client:", "role:")


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
    try:
        if args.policy_command == "check":
            return _check(args)
        if args.policy_command == "test":
            failures = run_tests(args.paths)
            return 1 if failures else 0
        findings = lint(_configured(args).rules)
    except PolicyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
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


# --- lint ---


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    source: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.rule}: {self.problem}"


def _object_problem(obj: str, act: str) -> str | None:
    if obj == "*":
        return None
    body = obj[:-1] if obj.endswith("*") else obj
    if "*" in body:
        return "a `*` before the end is a literal character here, so this object can never match"
    prefix = next((p for p in OBJECT_ACTIONS if obj.startswith(p)), None)
    if prefix is None:
        if not any(p.startswith(body) for p in OBJECT_ACTIONS):
            return "the object starts with no known kind (mcp:, a2a:, llm:, admin:): it can never match"
        return None
    if prefix == "admin:" and not obj.endswith("*") and obj.removeprefix("admin:") not in ADMIN_AREAS:
        return f"unknown admin area: use one of {', '.join(ADMIN_AREAS)}"
    if act != "*" and act not in OBJECT_ACTIONS[prefix]:
        return f"action {act!r} never happens on {prefix} objects"
    return None


def _covers(broad: Rule, narrow: Rule) -> bool:
    b_sub, b_obj, b_act, _ = broad.fields
    n_sub, n_obj, n_act, _ = narrow.fields
    subject = b_sub in ("*", n_sub)
    pattern = b_obj == n_obj or (b_obj.endswith("*") and object_match(n_obj.rstrip("*"), b_obj))
    return subject and pattern and b_act in ("*", n_act)


def lint(rules: Sequence[Rule]) -> list[Finding]:
    """Rules that can never match or never allow, roles that are never granted or grant nothing."""
    findings: list[Finding] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    p_rules = [r for r in rules if r.kind == "p"]
    g_rules = [r for r in rules if r.kind == "g"]
    granted = {r.fields[1] for r in g_rules}
    members = {r.fields[0] for r in g_rules}
    used = {r.fields[0] for r in p_rules}
    for rule in rules:
        key = (rule.kind, rule.fields)
        if key in seen:
            findings.append(Finding(rule.text, rule.source, "duplicate rule"))
        seen.add(key)
    for rule in p_rules:
        sub, obj, act, eft = rule.fields
        if sub not in ("*", "anonymous") and not sub.startswith(SUBJECT_PREFIXES):
            findings.append(
                Finding(rule.text, rule.source, "the subject has no user:, client: or role: prefix")
            )
        if (problem := _object_problem(obj, act)) is not None:
            findings.append(Finding(rule.text, rule.source, problem))
        if act not in ACTIONS:
            findings.append(Finding(rule.text, rule.source, f"unknown action {act!r}"))
        if sub.startswith("role:") and sub not in granted:
            findings.append(
                Finding(
                    rule.text,
                    rule.source,
                    f"{sub} is granted by no g rule (only tokens carrying it reach it)",
                )
            )
        if eft == "allow":
            shadow = next((d for d in p_rules if d.fields[3] == "deny" and _covers(d, rule)), None)
            if shadow is not None:
                findings.append(Finding(rule.text, rule.source, f"can never allow: {shadow.text} denies it"))
    for rule in g_rules:
        role = rule.fields[1]
        if role not in used and role not in members:
            findings.append(Finding(rule.text, rule.source, f"{role} grants nothing: no p rule names it"))
    return findings
