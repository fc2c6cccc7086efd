"""`agentgw policy ...` on the repository's policies, small ones written here and a recorded audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import pytest

from agentgw.call import Call, Principal, Reply
from agentgw.cli import main
from agentgw.cli.policy import who_can
from agentgw.cli.settings import DEMO_POLICY
from agentgw.errors import BudgetExceeded, GatewayError
from agentgw.filters.audit import Audit
from agentgw.filters.authorize import Authorize, CasbinAuthorizer, read_rules
from agentgw.pipeline import CallNext, Pipeline
from agentgw.records.audit import AuditSettings
from agentgw.settings import PACKAGE_POLICIES
from agentgw.storage import make_engine
from agentgw.storage.audit import SqlAuditLog

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


DEV = "p, role:developer, mcp:demo/*, *, allow"
DENY = "p, *, mcp:demo/delete_repo, *, deny"


def demo_line(rule: str) -> int:
    """Where `rule` stands in the demo policy (1-based), so the tests follow edits of the file."""
    return Path(DEMO).read_text().splitlines().index(rule) + 1


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_the_repositorys_policy_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "policy", "test", str(POLICIES / "tests"))
    assert code == 0, out
    assert "FAIL" not in out


def test_changing_one_expected_decision_makes_the_suite_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    # The demo cases name the packaged demo policy by its place beside policies/ in the repository.
    shutil.copytree(DEMO_POLICY.parent, tmp_path / "agentgw" / "demo")
    cases = copy / "tests" / "demo.yaml"
    text = cases.read_text()
    changed = text.replace(
        "{subject: user:audrey, object: admin:audit, action: write, expect: deny}",
        "{subject: user:audrey, object: admin:audit, action: write, expect: allow}",
    )
    assert changed != text
    cases.write_text(changed)
    code, out = run(capsys, "policy", "test", str(copy / "tests"))
    assert code == 1
    assert out.count("FAIL") == 1 and "user:audrey write admin:audit" in out


def test_a_case_can_pin_the_rule_that_must_decide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.csv").write_text("p, role:a, mcp:x/*, *\np, role:a, mcp:x/y, call\n")
    (tmp_path / "t.yaml").write_text(
        "policy: p.csv\ncases:\n"
        "  - {subject: user:u, roles: [a], object: mcp:x/y, action: call, expect: allow,"
        ' rule: "p, role:a, mcp:x/y, call, allow"}\n'
    )
    code, out = run(capsys, "policy", "test", str(tmp_path / "t.yaml"))
    assert code == 1 and "decided by 'p, role:a, mcp:x/*, *, allow'" in out


@pytest.mark.parametrize(
    "content",
    [
        "cases: []\n",
        "policy: p.csv\ncases:\n  - {subject: a, object: b, action: call}\n",
        "policy: p.csv\ncases:\n  - {subject: a, object: b, action: call, expect: maybe}\n",
        "policy: p.csv\ncases:\n  - {subject: a, object: b, action: call, expect: allow, colour: red}\n",
        "policy: missing.csv\ncases: []\n",
        "policy: [p.csv\n",
    ],
)
def test_malformed_test_files_are_errors_not_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    (tmp_path / "p.csv").write_text("p, a, mcp:x/y, call\n")
    (tmp_path / "t.yaml").write_text(content)
    code, _ = run(capsys, "policy", "test", str(tmp_path / "t.yaml"))
    assert code == 2


def test_an_empty_test_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "policy", "test", str(tmp_path))[0] == 2


def test_check_prints_the_decision_and_the_rule_or_that_none_matched(
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = str(DEMO_POLICY)
    code, out = run(capsys, "policy", "check", "user:alice", "mcp:demo/delete_repo", "call", "--policy", demo)
    assert code == 1 and out.splitlines() == ["deny", "  decided by: p, *, mcp:demo/delete_repo, *, deny"]
    code, out = run(
        capsys, "policy", "check", "user:x", "admin:audit", "read", "--role", "auditor", "--policy", demo
    )
    assert code == 0 and out.splitlines() == [
        "allow",
        "  decided by: p, role:auditor, admin:audit, read, allow",
    ]
    code, out = run(capsys, "policy", "check", "user:x", "mcp:demo/get_weather", "call", "--policy", demo)
    assert code == 1 and "no rule matched" in out


def test_check_reads_the_configured_policy_without_policy_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("policy:\n  rules: ['p, user:bob, mcp:x/*, call']\n")
    code, out = run(capsys, "policy", "check", "--config", str(config), "user:bob", "mcp:x/y", "call")
    assert code == 0 and out.startswith("allow")


def test_lint_is_clean_on_the_demo_and_flags_every_kind_of_dead_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "policy", "lint", "--policy", str(DEMO_POLICY))[0] == 0
    (tmp_path / "p.csv").write_text(
        "\n".join(
            [
                "p, role:dev, mcp:github/*, *",
                "p, role:dev, mcp:github/*, *",
                "p, alice, mcp:github/x, call",
                "p, role:dev, github/x, call",
                "p, role:dev, mcp:git*hub/x, call",
                "p, role:dev, admin:secrets, read",
                "p, role:dev, admin:audit, call",
                "p, role:dev, mcp:docs/x, write",
                "p, role:ghost, mcp:docs/*, list",
                "p, *, mcp:docs/*, *, deny",
                "p, role:dev, mcp:docs/y, call",
                "g, user:a, role:dev",
                "g, user:b, role:nothing",
            ]
        )
    )
    code, out = run(capsys, "policy", "lint", "--policy", str(tmp_path / "p.csv"))
    assert code == 1
    expected = [
        ":2: p, role:dev, mcp:github/*, *, allow: duplicate rule",
        ":3: p, alice, mcp:github/x, call, allow: the subject has no",
        ":4: p, role:dev, github/x, call, allow: the object starts with no known kind",
        ":5: p, role:dev, mcp:git*hub/x, call, allow: a `*` before the end",
        ":6: p, role:dev, admin:secrets, read, allow: unknown admin area",
        ":7: p, role:dev, admin:audit, call, allow: action 'call' never happens on admin: objects",
        ":8: p, role:dev, mcp:docs/x, write, allow: action 'write' never happens on mcp: objects",
        ":9: p, role:ghost, mcp:docs/*, list, allow: role:ghost is granted by no g rule",
        ":11: p, role:dev, mcp:docs/y, call, allow: can never allow: p, *, mcp:docs/*, *, deny denies it",
        ":13: g, user:b, role:nothing: role:nothing grants nothing",
    ]
    for line in expected:
        assert line in out, line


# --- who-can, what-can, explain ---

DEMO = str(DEMO_POLICY)
EXAMPLES = POLICIES / "examples"


def lines(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_who_can_names_principals_through_roles_with_the_granting_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = lines(capsys, "policy", "who-can", "mcp:demo/get_weather", "call", "--policy", DEMO)
    assert code == 0
    assert [line.split("  [")[0].split() for line in out] == [
        ["allow", "role:developer", "*", "mcp:demo/*"],
        ["allow", "user:alice", "(via", "role:developer)", "*", "mcp:demo/*"],
        ["allow", "role:reader", "*", "mcp:demo/get_weather"],
        ["allow", "user:bob", "(via", "role:reader)", "*", "mcp:demo/get_weather"],
    ]
    assert out[1].endswith(f"[{DEV} at {DEMO}:{demo_line(DEV)}]")
    assert "allowed call on mcp:demo/get_weather: role:developer, role:reader, user:alice, user:bob" in err
    assert lines(capsys, "policy", "who", "mcp:demo/get_weather", "call", "--policy", DEMO)[1] == out


def test_who_can_shows_a_break_glass_deny_as_such_and_the_allows_it_overrides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = lines(capsys, "policy", "who-can", "mcp:demo/delete_repo", "call", "--policy", DEMO)
    assert code == 0
    assert out[0].startswith("deny   * (everyone)") and "p, *, mcp:demo/delete_repo, *, deny at" in out[0]
    assert [line.split()[1] for line in out[1:]] == ["role:developer", "user:alice"]
    assert all("overridden by: p, *, mcp:demo/delete_repo, *, deny" in line for line in out[1:])
    assert "allowed call on mcp:demo/delete_repo: nobody" in err


@pytest.mark.parametrize("example", sorted(p.name for p in (POLICIES / "examples").glob("*.csv")))
def test_who_can_agrees_with_the_enforcer_on_every_example(
    capsys: pytest.CaptureFixture[str], example: str
) -> None:
    rules = read_rules(EXAMPLES / example)
    enforcer = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, rules)
    objects = {r.fields[1].replace("*", "anything") for r in rules if r.kind == "p" and r.fields[1] != "*"}
    assert objects
    for obj in sorted(objects):
        for action in ("list", "call", "read"):
            grants = who_can(rules, obj, action)
            said = {g.subject for g in grants if g.effect == "allow" and g.denied_by is None}
            subjects = {g.subject for g in grants} - {"*"}
            for subject in subjects:
                decided = enforcer.explain(subject, (), (), obj, action).allowed
                assert decided == (subject in said), (subject, obj, action)


def test_what_can_follows_nested_roles_and_token_roles_and_marks_denies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.csv"
    policy.write_text(
        "p, role:base, mcp:docs/*, list\n"
        "p, role:lead, mcp:github/*, *\n"
        "p, role:lead, mcp:github/merge_*, call, deny\n"
        "p, role:oncall, mcp:k8s/get_pods, call\n"
        "p, user:zoe, llm:gpt, call\n"
        "p, user:other, llm:secret, call\n"
        "g, user:zoe, role:lead\n"
        "g, role:lead, role:base\n"
    )
    code, out, err = lines(
        capsys, "policy", "what-can", "user:zoe", "--role", "oncall", "--policy", str(policy)
    )
    assert code == 0
    assert [line.split("  [")[0].split() for line in out] == [
        ["deny", "role:lead", "call", "mcp:github/merge_*"],
        ["allow", "role:base", "(via", "role:lead)", "list", "mcp:docs/*"],
        ["allow", "role:lead", "*", "mcp:github/*"],
        ["allow", "role:oncall", "call", "mcp:k8s/get_pods"],
        ["allow", "user:zoe", "call", "llm:gpt"],
    ]
    assert out[2].endswith("except: p, role:lead, mcp:github/merge_*, call, deny")
    assert "user:zoe: 4 allowing rule(s), 1 denying or overridden" in err


def test_explain_gives_the_decision_the_rules_that_apply_and_the_matcher_in_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = lines(
        capsys, "policy", "explain", "user:alice", "mcp:demo/delete_repo", "call", "--policy", DEMO
    )
    assert code == 1
    assert out[:2] == ["deny", "  decided by: p, *, mcp:demo/delete_repo, *, deny"]
    assert out[2].startswith('  matcher: (p.sub == "*" || g(r.sub, p.sub)) && objectMatch(r.obj, p.obj)')
    assert "a deny beats every allow" in out[4] and "default deny" in out[4]
    assert out[5:] == [
        "  rules that apply:",
        f"    deny   * (everyone)  [p, *, mcp:demo/delete_repo, *, deny at {DEMO}:{demo_line(DENY)}]",
        f"    allow  role:developer  [p, role:developer, mcp:demo/*, *, allow at {DEMO}:{demo_line(DEV)}]",
    ]
    code, out, _ = lines(
        capsys, "policy", "explain", "user:nobody", "mcp:demo/get_weather", "call", "--policy", DEMO
    )
    assert code == 1 and out[1] == "  decided by: default deny (no rule matched)"
    assert out[-1] == "  rules that apply:"


def test_explain_says_when_the_model_is_not_agentgws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.conf"
    model.write_text((PACKAGE_POLICIES / "model.conf").read_text().replace('p.act == "*" || ', ""))
    code, out, _ = lines(
        capsys,
        "policy",
        "explain",
        "user:alice",
        "mcp:demo/x",
        "call",
        "--policy",
        DEMO,
        "--model",
        str(model),
    )
    # That model reads a rule's `*` action literally: alice's `*` grant no longer covers `call`.
    assert code == 1 and "  in words: a custom model: read its matcher and effect above" in out


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["what-can", "alice"], "unknown subject 'alice'"),
        (["what-can", "user:"], "unknown subject 'user:'"),
        (["what-can", "group:x"], "unknown subject 'group:x'"),
        (["who-can", "github/x"], "unknown object 'github/x'"),
        (["who-can", "mcp:"], "unknown object 'mcp:'"),
        (["who-can", "mcp:x/y", "delete"], "unknown action 'delete'"),
        (["explain", "user:a", "mcp:x/*", "call"], "is a pattern"),
        (["explain", "user:a", "ftp:x", "call"], "unknown object 'ftp:x'"),
        (["what-can", "\x1b[2Jalice"], "unknown subject '\\u001b[2Jalice'"),
    ],
)
def test_questions_of_unknown_shapes_are_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    code, out, err = lines(capsys, "policy", *argv, "--policy", DEMO)
    assert code == 2 and out == []
    assert complaint in err and "\x1b" not in err


def test_odd_characters_in_names_are_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.csv"
    policy.write_text("p, user:eve\u202e, mcp:x/\x1by, call\n")
    code, out, err = lines(capsys, "policy", "who-can", "mcp:x/\x1by", "--policy", str(policy))
    assert code == 0 and out[0].startswith("allow  user:eve\\u202e ")
    assert "mcp:x/\\u001by" in out[0] and "\x1b" not in out[0] + err and "\u202e" not in out[0] + err
    code, out, err = lines(
        capsys, "policy", "explain", "user:eve\u202e", "mcp:x/\x1by", "call", "--policy", str(policy)
    )
    assert code == 0 and out[-1].startswith(
        "    allow  user:eve\\u202e  [p, user:eve\\u202e, mcp:x/\\u001by, call"
    )
    assert "\x1b" not in "".join(out) + err and "\u202e" not in "".join(out) + err


# --- replay ---

ALICE = Principal("user:alice", roles=("role:developer",))
DAN = Principal("user:dan")
CAROL = Principal("user:carol", roles=("role:reader",))


async def _over_budget(call: Call, call_next: CallNext) -> Reply:
    if call.resource == "mcp:demo/search_docs":
        raise BudgetExceeded("budget exhausted")
    return await call_next(call)


def record_calls(path: Path, calls: list[Call]) -> None:
    """Run `calls` through the gateway's audit, policy (demo policy) and a budget stage that refuses
    search_docs, into the audit log at `path`: the records a gateway run writes."""
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    audit = Audit(log)
    policy = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", DEMO_POLICY, [])
    pipeline = Pipeline([audit, Authorize(policy), _over_budget], audit.admitted)

    async def answer(_: Call) -> Reply:
        return Reply()

    async def run_all() -> None:
        for call in calls:
            with contextlib.suppress(GatewayError):
                await pipeline.run(call, answer)
        await log.flush()

    asyncio.run(run_all())
    log.close()
    engine.dispose()


def mcp(action: str, obj: str, principal: Principal | None) -> Call:
    method = {"call": "tools/call", "read": "resources/read", "list": "tools/list"}[action]
    return Call("mcp", action, obj, "demo", method, principal=principal)  # type: ignore[arg-type]  # action is a literal the test knows


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    path = tmp_path / "audit.db"
    record_calls(
        path,
        [
            mcp("call", "mcp:demo/get_weather", ALICE),  # allowed by the developer rule
            mcp("call", "mcp:demo/delete_repo", ALICE),  # denied by the break-glass rule
            mcp("call", "mcp:demo/get_weather", CAROL),  # allowed by the reader rule
            mcp("call", "mcp:demo/get_weather", CAROL),
            mcp("call", "mcp:demo/get_weather", DAN),  # dan holds no role: default deny
            mcp("call", "mcp:demo/search_docs", ALICE),  # allowed, then refused by the budget
            mcp("list", "mcp:demo", ALICE),  # a listing: not a decision of one object
            mcp("call", "mcp:demo/get_weather", None),  # no principal: refused before any rule
        ],
    )
    return path


def candidate(tmp_path: Path, policy: str) -> Path:
    directory = tmp_path / "candidate"
    directory.mkdir()
    shutil.copy(PACKAGE_POLICIES / "model.conf", directory / "model.conf")
    (directory / "policy.csv").write_text(policy)
    return directory


# The demo policy, but the break-glass deny is gone, readers lose the weather and dan is a developer.
CANDIDATE = (DEMO_POLICY).read_text().replace("p, *, mcp:demo/delete_repo, *, deny", "").replace(
    "p, role:reader, mcp:demo/get_weather, *, allow", ""
) + "g, user:dan, role:developer\n"


def test_the_recorded_log_holds_what_the_gateway_decided_and_default_deny(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "query", "--database-url", f"sqlite:///{recorded}", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decisions = [
        (r["subject"], r["resource"], r["decision"], r["rule"]) for r in rows if r["event"] == "decision"
    ]
    assert ("user:dan", "mcp:demo/get_weather", "denied", "default deny") in decisions
    assert (
        "user:alice",
        "mcp:demo/delete_repo",
        "denied",
        "p, *, mcp:demo/delete_repo, *, deny",
    ) in decisions


def test_replay_lists_exactly_the_decisions_that_would_change(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "replay", "--policy", str(candidate(tmp_path, CANDIDATE))]
    code, out, err = lines(capsys, *argv, "--database-url", f"sqlite:///{recorded}")
    assert code == 1 and "the candidate allows 2 call(s) that were denied" in err
    changes = [line.split("  ") for line in out if line.startswith(("allowed ->", "denied ->"))]
    assert [(c[0], c[2], c[3], c[4], c[5], c[6]) for c in changes] == [
        (
            "denied -> allowed",
            "user:alice",
            "call",
            "mcp:demo/delete_repo",
            "was: p, *, mcp:demo/delete_repo, *, deny",
            "now: p, role:developer, mcp:demo/*, *, allow",
        ),
        (
            "allowed -> denied",
            "user:carol",
            "call",
            "mcp:demo/get_weather",
            "was: p, role:reader, mcp:demo/get_weather, *, allow",
            "now: default deny",
        ),
        (
            "allowed -> denied",
            "user:carol",
            "call",
            "mcp:demo/get_weather",
            "was: p, role:reader, mcp:demo/get_weather, *, allow",
            "now: default deny",
        ),
        (
            "denied -> allowed",
            "user:dan",
            "call",
            "mcp:demo/get_weather",
            "was: default deny",
            "now: p, role:developer, mcp:demo/*, *, allow",
        ),
    ]
    summary = out[len(changes) :]
    assert summary[0].startswith("6 recorded decision(s) since ")
    assert summary[0].endswith("4 would change (allowed -> denied: 2, denied -> allowed: 2)")
    assert summary[1:] == [
        "by subject:",
        "  user:alice  denied -> allowed: 1",
        "  user:carol  allowed -> denied: 2",
        "  user:dan  denied -> allowed: 1",
        "by object:",
        "  mcp:demo/delete_repo  denied -> allowed: 1",
        "  mcp:demo/get_weather  allowed -> denied: 2",
        "  mcp:demo/get_weather  denied -> allowed: 1",
    ]
    code, out, _ = lines(capsys, *argv, "--database-url", f"sqlite:///{recorded}", "--allow-widening")
    assert code == 0 and len([line for line in out if line.startswith(("denied ->", "allowed ->"))]) == 4


def test_replay_of_the_policy_in_force_changes_nothing_and_a_narrowing_passes(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{recorded}"
    code, out, _ = lines(capsys, "policy", "replay", "--policy", DEMO, "--database-url", url)
    assert (
        code == 0
        and out == [out[0]]
        and out[0].endswith("0 would change (allowed -> denied: 0, denied -> allowed: 0)")
    )
    # Without the developer rule, alice loses what it allowed: the weather, and search_docs (which
    # the budget refused after the policy allowed it); her denied delete_repo stays denied.
    narrower = (DEMO_POLICY).read_text().replace("p, role:developer, mcp:demo/*, *, allow", "")
    code, out, _ = lines(
        capsys, "policy", "replay", "--policy", str(candidate(tmp_path, narrower)), "--database-url", url
    )
    changed = [line.split("  ")[2:5] for line in out if line.startswith(("allowed ->", "denied ->"))]
    assert code == 0 and changed == [
        ["user:alice", "call", "mcp:demo/get_weather"],
        ["user:alice", "call", "mcp:demo/search_docs"],
    ]
    assert all(line.startswith("allowed -> denied") for line in out[:2])


def test_replay_with_a_since_after_every_record_and_on_an_empty_log_replays_nothing(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = str(candidate(tmp_path, CANDIDATE))
    code, out, err = lines(
        capsys,
        "policy",
        "replay",
        "--policy",
        policy,
        "--since",
        "2999-01-01T00:00:00Z",
        "--database-url",
        f"sqlite:///{recorded}",
    )
    assert code == 0 and out[0].startswith("0 recorded decision(s)") and "nothing was replayed" in err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    code, out, err = lines(capsys, "policy", "replay", "--policy", policy, "--database-url", empty)
    assert code == 0 and out[0].startswith("0 recorded decision(s)") and "nothing was replayed" in err


def test_replay_refuses_a_candidate_it_cannot_read(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{recorded}"
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    (no_model / "policy.csv").write_text("p, user:a, mcp:x/y, call\n")
    no_policy = tmp_path / "no-policy"
    no_policy.mkdir()
    shutil.copy(PACKAGE_POLICIES / "model.conf", no_policy / "model.conf")
    broken = candidate(tmp_path, "p, user:a, mcp:x/y, fly\n")
    for path, complaint in (
        (no_model, "has no model.conf"),
        (no_policy, "has no policy.csv"),
        (tmp_path / "absent.csv", "no candidate policy at"),
        (broken, "bad action"),
    ):
        code, out, err = lines(capsys, "policy", "replay", "--policy", str(path), "--database-url", url)
        assert code == 2 and out == [] and complaint in err, (path, err)
    code, _, err = lines(
        capsys, "policy", "replay", "--policy", DEMO, "--since", "yesterday", "--database-url", url
    )
    assert code == 2 and "invalid time" in err


# --- add and remove ---

POLICY_TEXT = "# the team's policy\np, role:dev, mcp:github/*, *\n\ng, user:ann, role:dev\n"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.csv"
    path.write_text(POLICY_TEXT)
    path.chmod(0o640)
    return path


def test_add_appends_the_rules_and_keeps_the_rest_of_the_file(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = lines(
        capsys,
        "policy",
        "add",
        "p, role:dev, mcp:k8s/get_pods, call",
        "p, *, mcp:github/delete_repo, *, deny",
        "--policy",
        str(policy_file),
    )
    assert code == 0 and out == [
        f"p, role:dev, mcp:k8s/get_pods, call, allow: added to {policy_file}",
        f"p, *, mcp:github/delete_repo, *, deny: added to {policy_file}",
    ]
    assert policy_file.read_text() == POLICY_TEXT + (
        "p, role:dev, mcp:k8s/get_pods, call, allow\np, *, mcp:github/delete_repo, *, deny\n"
    )
    assert policy_file.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in policy_file.parent.iterdir()] == ["policy.csv"]  # no temporary file left
    code, checked = run(
        capsys, "policy", "check", "user:ann", "mcp:github/delete_repo", "call", "--policy", str(policy_file)
    )
    assert code == 1 and "p, *, mcp:github/delete_repo, *, deny" in checked


def test_remove_drops_the_rule_however_it_was_written(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = lines(
        capsys, "policy", "remove", "p,role:dev,mcp:github/*,*,allow", "--policy", str(policy_file)
    )
    assert code == 2 and out == [] and "the policy is empty" in err  # it was the only p rule
    assert policy_file.read_text() == POLICY_TEXT
    policy_file.write_text(POLICY_TEXT + "p, role:dev, mcp:docs/*, list\n")
    code, out, _ = lines(
        capsys, "policy", "remove", "p,role:dev,mcp:github/*,*,allow", "--policy", str(policy_file)
    )
    assert code == 0 and out == [f"p, role:dev, mcp:github/*, *, allow: removed from {policy_file}"]
    assert (
        policy_file.read_text()
        == "# the team's policy\n\ng, user:ann, role:dev\np, role:dev, mcp:docs/*, list\n"
    )


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ("p, role:dev, mcp:x/y", "bad policy rule"),
        ("p, role:dev, mcp:x/y, fly", "bad action"),
        ("q, role:dev, mcp:x/y, call", "must start with p or g"),
        ("p, role:dev, mcp:x/a b, call", "bad field"),
        ("p, role:dev, mcp:x/\x1b, call", "not printable"),
        ("p, alice, mcp:x/y, call", "the subject has no user:, client: or role: prefix"),
        ("p, role:dev, mcp:x*y, call", "a `*` before the end"),
        ("p, role:dev, mcp:github/*, *", "duplicate rule"),
        ("p, role:dev, admin:audit, call", "never happens on admin: objects"),
    ],
)
def test_add_refuses_a_bad_rule_and_leaves_the_file_as_it_was(
    policy_file: Path, capsys: pytest.CaptureFixture[str], rule: str, complaint: str
) -> None:
    code, out, err = lines(
        capsys, "policy", "add", "p, role:dev, mcp:ok/*, list", rule, "--policy", str(policy_file)
    )
    assert code == 2 and out == [] and complaint in err and "\x1b" not in err
    assert policy_file.read_text() == POLICY_TEXT


def test_remove_refuses_a_rule_the_policy_does_not_hold(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = lines(capsys, "policy", "remove", "g, user:ann, role:ops", "--policy", str(policy_file))
    assert code == 2 and "no such rule to remove: g, user:ann, role:ops" in err
    assert policy_file.read_text() == POLICY_TEXT


def test_add_and_remove_edit_the_configured_file_or_the_database(
    tmp_path: Path, policy_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"policy:\n  file: {policy_file}\n")
    assert main(["policy", "add", "p, role:dev, mcp:k8s/*, list", "--config", str(config)]) == 0
    assert policy_file.read_text().endswith("p, role:dev, mcp:k8s/*, list, allow\n")
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    config.write_text(f"database_url: {url}\npolicy:\n  file: {policy_file}\n  database: true\n")
    before = policy_file.read_text()
    assert main(["policy", "add", "p, user:ann, llm:gpt, call", "--config", str(config)]) == 0
    assert policy_file.read_text() == before
    engine = make_engine(url)
    in_force = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, [], allow_empty=True, database=engine)
    assert [r.text for r in in_force.rules] == ["p, user:ann, llm:gpt, call, allow"]
    capsys.readouterr()
    # Only the database's rules are removed here: the file's stay the file's.
    assert main(["policy", "remove", "p, role:dev, mcp:k8s/*, list", "--config", str(config)]) == 2
    assert "no such rule to remove" in capsys.readouterr().err
    assert main(["policy", "remove", "p, user:ann, llm:gpt, call", "--config", str(config)]) == 0
    in_force.reload()
    assert in_force.rules == []
    engine.dispose()


def test_add_without_a_policy_file_or_database_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENTGW_CONFIG", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text("policy:\n  rules: ['p, user:bob, mcp:x/*, call']\n")
    code, _, err = lines(capsys, "policy", "add", "p, user:bob, mcp:y/*, call", "--config", str(config))
    assert code == 2 and "names no policy file" in err


def test_explain_names_the_rules_that_reach_the_current_actor(capsys: pytest.CaptureFixture[str]) -> None:
    policy = str(EXAMPLES / "delegation.csv")
    argv = ["policy", "explain", "user:eve", "mcp:github/merge_pull_request", "call", "--policy", policy]
    code, out, _ = lines(capsys, *argv, "--actor", "client:triage-agent")
    assert code == 1 and out[1] == "  decided by: p, role:agent, mcp:github/merge_pull_request, *, deny"
    assert out[-2:] == [
        f"    allow  role:engineer  [p, role:engineer, mcp:github/*, *, allow at {policy}:4]",
        "    deny   role:agent, for the actor client:triage-agent  "
        f"[p, role:agent, mcp:github/merge_pull_request, *, deny at {policy}:9]",
    ]


def test_an_edit_that_cannot_be_written_leaves_the_file_and_no_temporary_behind(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agentgw.cli.policy.os.replace", full_disk)
    code, out, err = lines(
        capsys, "policy", "add", "p, role:dev, mcp:k8s/get_pods, call", "--policy", str(policy_file)
    )
    assert code == 2 and out == [] and f"cannot write {policy_file}: [Errno 28] No space left" in err
    assert policy_file.read_text() == POLICY_TEXT
    assert [p.name for p in policy_file.parent.iterdir()] == ["policy.csv"]
