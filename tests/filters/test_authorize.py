"""The policy stage: default deny, deny beats allow, delegation, safe names, reloads, the database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentgw.call import Call, Principal, Reply
from agentgw.errors import Forbidden
from agentgw.filters.authorize import Authorize, CasbinAuthorizer, PolicyError, parse_rule
from agentgw.ingress.mcp.messages import item_object
from agentgw.settings import PACKAGE_POLICIES
from agentgw.storage import make_engine

MODEL = PACKAGE_POLICIES / "model.conf"
ALICE = Principal("user:alice", roles=("role:dev",))
BOB = Principal("user:bob")


def authorizer(*rules: str, **options: object) -> CasbinAuthorizer:
    return CasbinAuthorizer(MODEL, None, list(rules), **options)  # type: ignore[arg-type]


def write(path: Path, text: str) -> None:
    # A new mtime for each edit, even within one clock tick.
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_nothing_is_allowed_that_no_rule_allows() -> None:
    policy = authorizer("p, role:dev, mcp:github/list_issues, call")
    assert policy.decide(ALICE, "mcp:github/list_issues", "call").allowed
    assert not policy.decide(ALICE, "mcp:github/list_issues", "list").allowed
    assert not policy.decide(ALICE, "mcp:github/create_issue", "call").allowed
    decision = policy.decide(BOB, "mcp:github/list_issues", "call")
    assert not decision.allowed and decision.rule is None


def test_an_explicit_deny_beats_any_allow_and_is_named_as_the_deciding_rule() -> None:
    policy = authorizer("p, role:dev, mcp:github/*, *", "p, *, mcp:github/delete_*, *, deny")
    allowed = policy.decide(ALICE, "mcp:github/create_issue", "call")
    assert allowed.allowed and allowed.rule == "p, role:dev, mcp:github/*, *, allow"
    denied = policy.decide(ALICE, "mcp:github/delete_repo", "call")
    assert not denied.allowed and denied.rule == "p, *, mcp:github/delete_*, *, deny"


def test_roles_come_from_g_rules_and_from_the_token() -> None:
    policy = authorizer("p, role:ops, admin:registry, write", "g, user:bob, role:ops")
    assert policy.decide(BOB, "admin:registry", "write").allowed
    assert policy.decide(Principal("user:carol", roles=("role:ops",)), "admin:registry", "write").allowed
    assert not policy.decide(Principal("user:carol"), "admin:registry", "write").allowed


def test_a_delegated_call_needs_both_the_user_and_the_current_actor() -> None:
    policy = authorizer(
        "p, role:dev, mcp:github/*, *",
        "p, client:triage, mcp:github/list_issues, *",
        "p, client:triage, mcp:github/label, *",
        "p, client:old, mcp:github/*, *",
    )
    as_triage = Principal("user:alice", roles=("role:dev",), actors=("client:triage", "client:old"))
    assert policy.decide(as_triage, "mcp:github/list_issues", "call").allowed
    assert not policy.decide(as_triage, "mcp:github/create_issue", "call").allowed
    assert not policy.decide(
        Principal("user:bob", actors=("client:triage",)), "mcp:github/label", "call"
    ).allowed


@pytest.mark.parametrize(
    "name",
    [
        "*",
        "list_*",
        "../admin",
        "list_issues/../../x",
        "x/y",
        "list_issues\u2215x",  # DIVISION SLASH, looks like /
        "\uff4cist_issues",  # FULLWIDTH LATIN SMALL LETTER L
        "list_issues__x",  # the namespacing separator
        "list_issues ",
        "",
    ],
)
def test_a_tool_name_can_never_widen_a_pattern_or_reach_another_object(name: str) -> None:
    policy = authorizer("p, role:dev, mcp:github/list_issues, *", "p, role:dev, mcp:docs/*, *")
    obj = item_object("github", "tools", {"name": name})
    assert obj.startswith("mcp:github/")
    assert not policy.decide(ALICE, obj, "call").allowed
    # A pattern rule still covers only its own server, whatever the name holds.
    assert not policy.decide(ALICE, item_object("docs2", "tools", {"name": name}), "call").allowed


def test_a_star_in_a_request_is_never_read_as_a_pattern() -> None:
    policy = authorizer("p, role:dev, mcp:github/a*, *")
    assert policy.decide(ALICE, "mcp:github/abc", "call").allowed
    assert not authorizer("p, role:dev, mcp:github/abc, *").decide(ALICE, "mcp:github/*", "call").allowed


@pytest.mark.parametrize(
    "line",
    [
        "p, role:dev, mcp:x/*",
        "p, role:dev, mcp:x/*, call, maybe",
        "p, role:dev, mcp:x/*, delete",
        "p, role dev, mcp:x/*, call",
        'p, role:dev, mcp:x/"y", call',
        "g, user:a",
        "x, a, b",
    ],
)
def test_malformed_rules_are_refused_with_where_they_came_from(line: str) -> None:
    with pytest.raises(PolicyError, match="somewhere"):
        parse_rule(line, "somewhere")


def test_an_empty_or_unreadable_policy_is_refused_unless_explicitly_allowed(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="empty"):
        authorizer()
    assert not authorizer(allow_empty=True).decide(ALICE, "mcp:a/b", "call").allowed
    with pytest.raises(PolicyError, match="cannot read"):
        CasbinAuthorizer(MODEL, tmp_path / "missing.csv", [])
    with pytest.raises(PolicyError, match="cannot load"):
        CasbinAuthorizer(tmp_path / "missing.conf", None, ["p, a, b, call"])


def test_a_file_edit_takes_effect_on_the_next_decision_and_clears_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "policy.csv"
    write(path, "p, role:dev, mcp:github/list_issues, call\n")
    policy = CasbinAuthorizer(MODEL, path, [])
    assert not policy.decide(ALICE, "mcp:github/create_issue", "call").allowed  # cached now
    write(path, "p, role:dev, mcp:github/*, call\n")
    policy.refresh()
    assert policy.decide(ALICE, "mcp:github/create_issue", "call").allowed
    assert policy.generation == 1


def test_a_model_edit_takes_effect_when_the_watcher_looks_at_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.conf"
    write(model, MODEL.read_text())
    policy = CasbinAuthorizer(model, None, ["p, role:dev, mcp:github/*, call"])
    assert policy.decide(ALICE, "mcp:github/x", "call").allowed
    write(model, MODEL.read_text().replace('(p.act == "*" || r.act == p.act)', 'r.act == "nothing"'))
    policy.refresh(model=True)  # what `watch` does every DB_POLL_S
    assert not policy.decide(ALICE, "mcp:github/x", "call").allowed
    assert policy.generation == 1


@pytest.mark.parametrize("broken", ["p, role:dev\n", "", "# only a comment\n", "\xff\xfe"])
def test_a_broken_edit_is_refused_and_the_last_good_policy_stays(tmp_path: Path, broken: str) -> None:
    path = tmp_path / "policy.csv"
    write(path, "p, role:dev, mcp:github/*, call\n")
    policy = CasbinAuthorizer(MODEL, path, [])
    path.write_bytes(broken.encode("latin-1"))
    os.utime(path, ns=(1, 1))
    policy.refresh()
    assert policy.decide(ALICE, "mcp:github/x", "call").allowed
    assert policy.last_error is not None
    write(path, "p, role:dev, mcp:docs/*, call\n")  # the next good edit is picked up again
    policy.refresh()
    assert not policy.decide(ALICE, "mcp:github/x", "call").allowed
    assert policy.last_error is None


def test_database_rules_are_shared_between_nodes_through_the_sql_adapter(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'policy.db'}")
    node_a = authorizer("p, role:admin, admin:policies, *", database=engine)
    node_b = authorizer("p, role:admin, admin:policies, *", database=engine)
    assert not node_b.decide(BOB, "mcp:github/x", "call").allowed
    rule = node_a.add_rule("p, user:bob, mcp:github/*, call")
    assert rule.source == "database" and node_a.decide(BOB, "mcp:github/x", "call").allowed
    assert node_b.refresh_database()
    assert node_b.decide(BOB, "mcp:github/x", "call").allowed
    with pytest.raises(PolicyError, match="already"):
        node_a.add_rule("p, user:bob, mcp:github/*, call, allow")
    assert node_a.remove_rule("p, user:bob, mcp:github/*, call")
    assert not node_a.remove_rule("p, user:bob, mcp:github/*, call")
    assert node_b.refresh_database() and not node_b.decide(BOB, "mcp:github/x", "call").allowed


def test_rules_cannot_be_edited_without_the_database_source_or_emptied_away(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="files"):
        authorizer("p, a, mcp:x/y, call").add_rule("p, b, mcp:x/y, call")
    engine = make_engine(f"sqlite:///{tmp_path / 'policy.db'}")
    only_db = CasbinAuthorizer(MODEL, None, [], allow_empty=True, database=engine)
    only_db.add_rule("p, user:bob, mcp:x/*, call")
    strict = CasbinAuthorizer(MODEL, None, [], database=engine)
    with pytest.raises(PolicyError, match="empty"):
        strict.remove_rule("p, user:bob, mcp:x/*, call")


# --- the stage ---


async def test_a_denied_call_never_reaches_the_next_stage_and_names_what_was_refused() -> None:
    reached: list[Call] = []

    async def upstream(c: Call) -> Reply:
        reached.append(c)
        return Reply()

    stage = Authorize(authorizer("p, role:dev, mcp:github/list_issues, call"))
    call = Call("mcp", "call", "mcp:github/secret_tool", "github", "tools/call", principal=ALICE)
    with pytest.raises(Forbidden) as caught:
        await stage(call, upstream)
    assert caught.value.message == "denied by policy: user:alice may not call mcp:github/secret_tool"
    assert reached == []
    with pytest.raises(Forbidden):
        await stage(Call("mcp", "call", "mcp:github/list_issues", "github", "tools/call"), upstream)
    assert reached == []


async def test_a_denial_reads_the_same_whether_or_not_the_object_exists_and_escapes_the_name() -> None:
    async def upstream(_: Call) -> Reply:
        return Reply()

    stage = Authorize(authorizer("p, role:dev, mcp:github/*, *", "p, *, mcp:github/delete_*, *, deny"))
    words = []
    for name in ("delete_repo", "delete_nothing_of_that_name"):
        call = Call("mcp", "call", f"mcp:github/{name}", "github", "tools/call", principal=ALICE)
        with pytest.raises(Forbidden) as caught:
            await stage(call, upstream)
        words.append(caught.value.message.replace(name, "NAME"))
    assert words[0] == words[1] == "denied by policy: user:alice may not call mcp:github/NAME"
    odd = "mcp:elsewhere/resource/\x1b[31mred\n\u202e" + "x" * 1000
    with pytest.raises(Forbidden) as caught:
        await stage(Call("mcp", "read", odd, "elsewhere", "resources/read", principal=ALICE), upstream)
    message = caught.value.message
    assert message.isprintable() and len(message) < 300
    assert message.startswith(
        "denied by policy: user:alice may not read mcp:elsewhere/resource/\\x1b[31mred\\n\\u202e"
    )
    assert message.endswith("...[842 more]")


async def test_the_call_keeps_the_deciding_rule_or_default_deny_for_the_audit_record() -> None:
    async def upstream(_: Call) -> Reply:
        return Reply()

    stage = Authorize(authorizer("p, role:dev, mcp:github/*, *", "p, *, mcp:github/delete_*, *, deny"))
    allowed = Call("mcp", "call", "mcp:github/list_issues", "github", "tools/call", principal=ALICE)
    await stage(allowed, upstream)
    assert allowed.decided_by == "p, role:dev, mcp:github/*, *, allow"
    calls = {
        "p, *, mcp:github/delete_*, *, deny": Call(
            "mcp", "call", "mcp:github/delete_repo", "github", "tools/call", principal=ALICE
        ),
        "default deny": Call("mcp", "call", "mcp:k8s/get_pods", "k8s", "tools/call", principal=ALICE),
    }
    for rule, call in calls.items():
        with pytest.raises(Forbidden):
            await stage(call, upstream)
        assert call.decided_by == rule
    # A request naming several objects is refused for the first one refused, and says which.
    several = Call(
        "mcp",
        "read",
        "mcp:github/resource/a",
        "github",
        "resources/read",
        principal=ALICE,
        objects=("mcp:github/resource/b", "mcp:k8s/resource/c", "mcp:k8s/resource/d"),
    )
    with pytest.raises(Forbidden) as caught:
        await stage(several, upstream)
    assert caught.value.message.endswith("may not read mcp:k8s/resource/c")
    assert several.decided_by == "default deny"


async def test_a_listing_keeps_exactly_what_the_caller_may_list() -> None:
    async def upstream(_: Call) -> Reply:
        return Reply(listing=["mcp:github/a", "mcp:github/b", "mcp:github/c"])

    stage = Authorize(authorizer("p, role:dev, mcp:github/a, list", "p, role:dev, mcp:github/c, call"))
    reply = await stage(Call("mcp", "list", "mcp:github", "github", "tools/list", principal=ALICE), upstream)
    assert reply.listing == ["mcp:github/a"]
