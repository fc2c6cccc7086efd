"""The audit stage: redaction and digests (pure), and the records a pipeline run leaves behind."""

from __future__ import annotations

import fnmatch
import json
import random
import re
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from pydantic import ValidationError

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import BudgetExceeded, Forbidden, Unavailable, UpstreamError
from agentgw.filters.audit import (
    _NEEDLES,  # private: how redaction skips strings
    MAX_KNOWN_NAMES,
    Audit,
    _Redactor,  # private: its memory of argument names
    arguments_digest,
    redact,
)
from agentgw.pipeline import CallNext, Pipeline, ordered
from agentgw.records.audit import (
    BUILTIN_PATTERNS,
    DEFAULT_SECRET_ARGUMENTS,
    MAX_STRING,
    AuditRecord,
    RedactionSettings,
    builtin_replacement,
    capped,
    printable,
    timestamp,
)
from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery, SqlAuditLog, query

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
ALICE = Principal(subject="user:alice", client_id="ci-bot", roles=("role:dev",), actors=("client:planner",))


class MemorySink:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[AuditRecord] = []
        self.fail = fail

    async def write(self, record: AuditRecord) -> None:
        self.submit(record)

    def submit(self, record: AuditRecord) -> None:
        if self.fail:
            raise Unavailable("audit log unavailable: the call cannot be recorded, so it was not forwarded")
        self.records.append(record)


class Stage:
    """A stage that sets the principal, then optionally refuses (as authorize or budget would)."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        call.principal = ALICE
        call.decided_by = "p, user:alice, mcp:github/*, call, allow"
        if self.refuse is not None:
            raise self.refuse
        return await call_next(call)


async def passing(call: Call, call_next: CallNext) -> Reply:
    return await call_next(call)


def pipeline(audit: Audit, refuse: Exception | None = None) -> Pipeline:
    return ordered(
        audit=audit,
        authenticate=Stage(refuse),
        authorize=passing,
        budget=passing,
        credentials=passing,
        admitted=audit.admitted,
    )


def call(arguments: dict[str, Any] | None = None) -> Call:
    return Call(
        protocol="mcp",
        action="call",
        resource="mcp:github/create_issue",
        upstream="github",
        method="tools/call",
        run_id="run-7",
        session_id="s-1",
        arguments=arguments if arguments is not None else {"title": "hi", "token": "s3cret"},
    )


# --- redaction and digests ---------------------------------------------------------------------


def test_secret_argument_names_are_redacted_at_any_depth() -> None:
    kept = redact(
        {"title": "hi", "API_KEY": "k", "nested": {"password": "p", "ok": 1}, "list": [{"auth_token": "t"}]},
        "mcp:github/create_issue",
        RedactionSettings(),
    )
    assert kept is not None
    assert json.loads(kept) == {
        "title": "hi",
        "API_KEY": "[REDACTED]",
        "nested": {"password": "[REDACTED]", "ok": 1},
        "list": [{"auth_token": "[REDACTED]"}],
    }


@pytest.mark.parametrize(
    ("text", "secret", "kind"),
    [
        ("mail ada@example.com now", "ada@example.com", "email"),
        ("Authorization: Bearer abc.def-123", "abc.def-123", "bearer"),
        (f"token {JWT}", JWT, "jwt"),
        ("key sk-proj-abcdefghijklmnopqrstu", "sk-proj-abcdefghijklmnopqrstu", "api_key"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz", "api_key"),
        ("AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP", "api_key"),
        ("password=hunter2 and more", "hunter2", "api_key"),
    ],
)
def test_secret_values_are_redacted_inside_any_string(text: str, secret: str, kind: str) -> None:
    kept = redact({"note": text}, "mcp:x/y", RedactionSettings())
    assert kept is not None
    note = json.loads(kept)["note"]
    assert f"[REDACTED:{kind}]" in note
    assert secret not in note


def test_a_whole_tool_can_be_redacted_and_extra_patterns_apply() -> None:
    settings = RedactionSettings(tools=["mcp:vault/*"], patterns=[r"\bACCT-\d+\b"])
    assert json.loads(redact({"path": "a", "n": 1}, "mcp:vault/read", settings) or "") == {
        "path": "[REDACTED]",
        "n": "[REDACTED]",
    }
    assert json.loads(redact({"q": "pay ACCT-991"}, "mcp:bank/pay", settings) or "") == {
        "q": "pay [REDACTED:pattern]"
    }


def test_arguments_can_be_kept_as_a_digest_only() -> None:
    assert redact({"a": 1}, "mcp:x/y", RedactionSettings(store_arguments=False)) is None


def test_a_bad_redaction_pattern_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        RedactionSettings(patterns=["(unclosed"])


def test_the_digest_is_of_the_arguments_as_sent_whatever_their_key_order() -> None:
    first = arguments_digest({"b": 2, "a": "secret"})
    assert first == arguments_digest({"a": "secret", "b": 2})
    assert first != arguments_digest({"a": "secreT", "b": 2})
    assert first is not None and first.startswith("sha256:") and len(first) == 7 + 64
    assert arguments_digest(None) is None


def test_timestamps_are_datetimes_format_rounded_as_datetime_rounds() -> None:
    edges = [0.0, 1.5, -0.5, -0.0000005, 1.0000005, 1.0000015, 1e9 + 0.9999995, 1e9 + 0.9999994999]
    edges += [second + n * 0.5e-6 for second in (0.0, 1_767_268_800.0, -100.0) for n in range(-4, 5)]
    moments = edges + [random.Random(8).uniform(-1e10, 1e10) for _ in range(20_000)]
    for moment in moments:
        expected = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert timestamp(moment) == expected, moment
    assert timestamp(1_767_268_800.9999996) == "2026-01-01T12:00:01.000000Z"  # carried into the second
    with pytest.raises(OverflowError):
        timestamp(float("inf"))


def plain_redaction(text: str, settings: RedactionSettings) -> str:
    """Every configured substitution, in order, on every string: what the redactor's shortcuts must equal."""
    for name, pattern in BUILTIN_PATTERNS.items():
        if name in settings.builtin:
            text = pattern.sub(builtin_replacement(name), text)
    for extra in settings.patterns:
        text = re.sub(extra, "[REDACTED:pattern]", text)
    return capped(text, MAX_STRING)


@pytest.mark.parametrize(
    "settings",
    [
        RedactionSettings(),
        RedactionSettings(patterns=[r"\bACCT-\d+\b", "sk"]),
        RedactionSettings(builtin=["jwt"]),
    ],
)
def test_skipping_strings_without_a_needle_changes_no_redaction(settings: RedactionSettings) -> None:
    # Letters the patterns look for, their other cases (also the non-ASCII ones that fold to ASCII
    # under IGNORECASE), and the separators they need.
    alphabet = "bearBEARkKsS-_:=@.eyJxoglpatAKIzhGcnwdi \u0130\u0131\u017f\u212a" + "0123456789"
    rng = random.Random(9)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(10_000)]
    # Long ASCII strings are searched another way (`in`, on the string and its lower case).
    ascii_letters = alphabet.encode("ascii", "ignore").decode()
    texts += ["".join(rng.choice(ascii_letters) for _ in range(rng.randrange(120))) for _ in range(10_000)]
    texts += [
        "x@sk-aaaaaaaaaaaaaaaaaaaa.com",  # two patterns overlap: the first in order wins
        "token: Bearer abc",  # a replacement brings the `:` a later pattern needs
        f"BeArEr {JWT}",
        "api_key=" + "s" * 2000,
        "\u017fecret: hunter2",  # the long s folds to s under IGNORECASE
        "TOKEN=abc",
        "my_Secret : x",
        "passwd= y",
        "Api-Key:z",
        "apikey=z",
        "to\u212aen: v",  # the Kelvin sign folds to k
        "ap\u0131_key=v",  # the dotless i folds to i
        # `:`, `=`, `_` without a name before them: nothing to redact
        "https://example.com/a_b?x=1",
        "2026-01-01T10:00:00Z",
        "snake_case_name",
        # one of each `api_key` alternative
        "pk-abcdefghijklmnopqr",
        "ghs_abcdefghijklmnopqrstuvwxyz",
        "github_pat_abcdefghijklmnopqrstuv",
        "glpat-abcdefghijklmnopqrstuv",
        "xoxp-0123456789",
        "AKIA0123456789ABCDEF",
        "AIza" + "b" * 35,
    ]
    # The redactor's walk, not `redact`: the whole corpus is far past what a record keeps.
    kept = _Redactor(settings).value(dict(enumerate(texts)))
    for n, text in enumerate(texts):
        assert kept[str(n)] == plain_redaction(text, settings), text
    assert sum(kept[str(n)] != text for n, text in enumerate(texts)) >= 2  # the corpus does redact


def test_a_needle_finds_the_same_in_a_long_ascii_string_as_its_regex_does() -> None:
    rng = random.Random(11)
    letters = "abcdeghikoprstuwxyzABEGIJKOPRSTXZ-_@:= "
    texts = ["".join(rng.choice(letters) for _ in range(rng.randrange(25, 200))) for _ in range(5_000)]
    texts += ["my ApI-kEy is here", "GHS_x ghs_x", "xoxo", "Bearer", "PASSWD", "eyj eyJ"]
    for needle in _NEEDLES.values():
        for text in texts:
            assert needle.in_(text, text.lower()) == needle.in_(text, None), (needle.exact, text)
    assert sum(_NEEDLES["api_key"].in_(text, text.lower()) for text in texts) >= 10


def test_secret_names_match_as_each_glob_would_on_the_lowered_name() -> None:
    globs = [*DEFAULT_SECRET_ARGUMENTS, "[a-c]?", "*[!t]oken", "a[]b"]
    rng = random.Random(10)
    names = ["API_KEY", "x_Password_y", "Authorization", "cookies", "\u0130TOKEN", "\u017fecret", "ab", "a]b"]
    letters = "abcoknet_-*[]?ASKPW\u0130"
    names += ["".join(rng.choice(letters) for _ in range(rng.randrange(12))) for _ in range(5000)]
    kept = _Redactor(RedactionSettings(arguments=globs)).value(dict.fromkeys(names, "v"))
    for name in names:
        secret = any(fnmatch.fnmatchcase(name.lower(), glob.lower()) for glob in globs)
        assert (kept[name] == "[REDACTED]") == secret, name
    assert json.loads(redact({"password": "v"}, "mcp:x/y", RedactionSettings(arguments=[])) or "") == {
        "password": "v"
    }


def test_capped_keeps_the_start_and_says_how_much_was_cut_within_the_limit() -> None:
    assert capped("short", 128) == "short"
    cut = capped("x" * 1000 + "END", 128)
    assert len(cut) <= 128 and cut.startswith("x" * 100) and "END" not in cut
    assert cut.endswith(f"…[truncated {1003 - cut.index('…')} chars]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain: é 日本 ok", "plain: é 日本 ok"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[2J\x00\x7f\x9b", "\\u001b[2J\\u0000\\u007f\\u009b"),
        ("a\u202eb\u2066c\u200bd\ufeffe\u2028f\u00a0g", "a\\u202eb\\u2066c\\u200bd\\ufeffe\\u2028f\\u00a0g"),
        ("tag\U000e0041", "tag\\udb40\\udc41"),
        ("C:\\dir\\n", "C:\\\\dir\\\\n"),  # a backslash is escaped: `\\n` cannot pass for a newline
    ],
)
def test_printable_escapes_what_a_terminal_would_not_show_as_itself(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown.replace("\\", "\\\\")  # printable, but for the backslashes


def test_printable_json_stays_the_same_json() -> None:
    value = {"k\u202e": ["\x7f\x9b\u2066", "\\", "\U000e0041", "日本"]}
    text = printable(orjson.dumps(value).decode(), in_json=True)
    assert text.isprintable() and json.loads(text) == value


# --- the stage -----------------------------------------------------------------------------------


async def test_an_allowed_call_is_recorded_before_it_is_forwarded_then_its_outcome() -> None:
    sink = MemorySink()
    audit = Audit(sink)
    seen_at_forward: list[int] = []

    async def terminal(c: Call) -> Reply:
        seen_at_forward.append(len(sink.records))
        return Reply(payload="ok", usage=Usage(tokens=12, cost=0.5))

    await pipeline(audit).run(call(), terminal)
    assert seen_at_forward == [1]
    decision, outcome = sink.records
    assert (decision.event, decision.decision, outcome.event, outcome.status) == (
        "decision",
        "allowed",
        "outcome",
        "ok",
    )
    assert decision.request_id == outcome.request_id
    assert decision.subject == "user:alice" and decision.actors == ("client:planner",)
    assert decision.client_id == "ci-bot" and decision.run_id == "run-7" and decision.session_id == "s-1"
    assert decision.rule == "p, user:alice, mcp:github/*, call, allow"
    assert decision.arguments == '{"title":"hi","token":"[REDACTED]"}'
    assert decision.args_digest == arguments_digest({"title": "hi", "token": "s3cret"})
    assert outcome.arguments is None and (outcome.tokens, outcome.cost) == (12, 0.5)
    assert outcome.latency_ms is not None
    assert "s3cret" not in repr(sink.records)


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (Forbidden("denied by policy: user:alice may not call mcp:demo/delete_repo"), "denied_by_policy"),
        (BudgetExceeded("budget 'run' exhausted for run run-7: calls 10 of 10"), "budget_exceeded"),
    ],
)
async def test_a_refused_call_leaves_one_denied_record_with_its_reason(
    refusal: Exception, reason: str
) -> None:
    sink = MemorySink()
    forwarded: list[Call] = []

    async def terminal(c: Call) -> Reply:
        forwarded.append(c)
        return Reply()

    with pytest.raises(type(refusal)):
        await pipeline(Audit(sink), refusal).run(call(), terminal)
    assert forwarded == []
    [record] = sink.records
    assert (record.event, record.decision, record.reason) == ("decision", "denied", reason)
    assert record.detail == str(refusal)


async def test_no_record_no_forwarding() -> None:
    forwarded: list[Call] = []

    async def terminal(c: Call) -> Reply:
        forwarded.append(c)
        return Reply()

    with pytest.raises(Unavailable, match="audit log unavailable"):
        await pipeline(Audit(MemorySink(fail=True))).run(call(), terminal)
    assert forwarded == []


async def test_an_upstream_failure_after_admission_is_an_outcome_of_an_allowed_call() -> None:
    sink = MemorySink()

    async def terminal(c: Call) -> Reply:
        raise UpstreamError("upstream 'github' is unreachable")

    with pytest.raises(UpstreamError):
        await pipeline(Audit(sink)).run(call(), terminal)
    decision, outcome = sink.records
    assert (decision.event, decision.decision) == ("decision", "allowed")
    assert (outcome.event, outcome.decision, outcome.status) == ("outcome", "allowed", "upstream_error")


async def test_a_crash_is_recorded_as_an_error() -> None:
    sink = MemorySink()

    with pytest.raises(ZeroDivisionError):
        await pipeline(Audit(sink), ZeroDivisionError("boom")).run(call(), passing_terminal)
    [record] = sink.records
    assert (record.decision, record.reason, record.detail) == ("error", "internal_error", None)


async def passing_terminal(c: Call) -> Reply:
    return Reply()


async def test_a_streamed_answer_gets_its_outcome_when_it_ends() -> None:
    sink = MemorySink()

    async def streaming(c: Call) -> Reply:
        return Reply(payload="stream", streaming=True)

    reply = await pipeline(Audit(sink)).run(call(), streaming)
    assert [r.event for r in sink.records] == ["decision"]
    await reply.settle(Usage(tokens=99), "ok")
    assert [(r.event, r.tokens) for r in sink.records] == [("decision", None), ("outcome", 99)]


async def test_a_failing_outcome_write_does_not_hide_the_answer() -> None:
    sink = MemorySink()
    audit = Audit(sink)

    async def terminal(c: Call) -> Reply:
        sink.fail = True  # the store goes away after the decision record was written
        return Reply(payload="answer")

    reply = await pipeline(audit).run(call(), terminal)
    assert reply.payload == "answer"
    assert [r.event for r in sink.records] == ["decision"]


async def test_the_outcome_names_what_the_terminal_set_and_the_principal_it_ends_with() -> None:
    sink = MemorySink()
    bob = Principal(subject="user:bob")

    async def terminal(c: Call) -> Reply:
        c.session_id, c.upstream = "task-9", "github-eu"  # an A2A task id, the route that answered
        return Reply()

    await pipeline(Audit(sink)).run(call(), terminal)

    async def switching(c: Call) -> Reply:
        c.principal = bob
        return Reply()

    await pipeline(Audit(sink)).run(call(), switching)
    decision, outcome, _, switched = sink.records
    assert (decision.session_id, decision.upstream) == ("s-1", "github")
    assert (outcome.session_id, outcome.upstream) == ("task-9", "github-eu")
    assert outcome.args_digest == decision.args_digest and outcome.roles == decision.roles == ("role:dev",)
    assert (switched.subject, switched.roles) == ("user:bob", ())


async def test_the_reply_does_not_wait_for_the_outcome_to_be_committed_and_flush_does(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:

        async def terminal(c: Call) -> Reply:
            other.execute("BEGIN IMMEDIATE")  # hold the write lock: no commit can land until ROLLBACK
            return Reply(payload="answer")

        with anyio.fail_after(2):  # the writer would wait 5 s (busy_timeout) for the lock
            reply = await pipeline(Audit(log)).run(call(), terminal)
        assert reply.payload == "answer"
        # The decision is durable in the journal (0210); nothing reaches SQL while the lock is held.
        assert [event for (event,) in other.execute("SELECT event FROM audit_log")] == []
        other.execute("ROLLBACK")
        with anyio.fail_after(5):
            await log.flush()
        assert [event for (event,) in other.execute("SELECT event FROM audit_log ORDER BY id")] == [
            "decision",
            "outcome",
        ]
    log.close()
    engine.dispose()


async def test_an_outcome_the_closed_log_refuses_is_logged_and_the_answer_goes_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    log = SqlAuditLog(engine)

    async def terminal(c: Call) -> Reply:
        log.close()  # the gateway shuts down while the call is upstream
        return Reply(payload="answer")

    reply = await pipeline(Audit(log)).run(call(), terminal)
    assert reply.payload == "answer"
    assert "audit record not written: outcome allowed" in caplog.text
    assert [r["event"] for r in query(engine, AuditQuery())] == ["decision"]
    engine.dispose()


async def test_records_reach_the_sql_log_and_an_unwritable_log_refuses_calls(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    log = SqlAuditLog(engine)
    await pipeline(Audit(log)).run(call(), passing_terminal)
    log.close()
    rows = query(engine, AuditQuery())
    assert [(r["event"], r["decision"]) for r in rows] == [("decision", "allowed"), ("outcome", "allowed")]
    engine.dispose()

    readonly = make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    log = SqlAuditLog(readonly)
    forwarded: list[Call] = []

    async def terminal(c: Call) -> Reply:
        forwarded.append(c)
        return Reply()

    with pytest.raises(Unavailable) as refused:
        await pipeline(Audit(log)).run(call(), terminal)
    log.close()
    readonly.dispose()
    assert forwarded == []
    assert refused.value.http_status == 503


def test_caller_chosen_argument_names_never_grow_the_redactors_memory_past_its_bound() -> None:
    redactor = _Redactor(RedactionSettings())
    for n in range(MAX_KNOWN_NAMES + 100):
        assert redactor.secret_name(f"x{n}_password") is True
        assert redactor.secret_name(f"x{n}") is False
        assert len(redactor._names) <= MAX_KNOWN_NAMES  # names come from callers
