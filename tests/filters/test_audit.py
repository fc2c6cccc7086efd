"""The audit stage: redaction and digests (pure), and the records a pipeline run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import BudgetExceeded, Forbidden, Unavailable, UpstreamError
from agentgw.filters.audit import Audit, AuditRecord, RedactionSettings, arguments_digest, redact
from agentgw.pipeline import CallNext, Pipeline, ordered
from agentgw.storage import make_engine
from agentgw.storage.audit_log import AuditQuery, SqlAuditLog, query

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
ALICE = Principal(subject="user:alice", client_id="ci-bot", roles=("role:dev",), actors=("client:planner",))


class MemorySink:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[AuditRecord] = []
        self.fail = fail

    async def write(self, record: AuditRecord) -> None:
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
        (Forbidden("denied by policy: user:alice may not call this object"), "denied_by_policy"),
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
