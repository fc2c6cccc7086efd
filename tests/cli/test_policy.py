"""`agentgw policy check|test|lint` on the repository's policies and on small ones written here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agentgw.cli import main
from agentgw.cli.policy import who_can
from agentgw.filters.authorize import CasbinAuthorizer, read_rules
from agentgw.settings import PACKAGE_POLICIES

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


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
    demo = str(POLICIES / "demo.csv")
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
    assert run(capsys, "policy", "lint", "--policy", str(POLICIES / "demo.csv"))[0] == 0
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

DEMO = str(POLICIES / "demo.csv")
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
    assert out[1].endswith(f"[p, role:developer, mcp:demo/*, *, allow at {DEMO}:19]")
    assert "allowed call on mcp:demo/get_weather: role:developer, role:reader, user:alice, user:bob" in err


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
        f"    deny   * (everyone)  [p, *, mcp:demo/delete_repo, *, deny at {DEMO}:29]",
        f"    allow  role:developer  [p, role:developer, mcp:demo/*, *, allow at {DEMO}:19]",
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
