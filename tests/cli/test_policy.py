"""`agentgw policy check|test|lint` on the repository's policies and on small ones written here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agentgw.cli import main

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
