"""Metrics: what a finished call adds, which label values it may use, and what a scrape shows."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import BudgetExceeded, Forbidden, UpstreamTimeout
from agentgw.metrics import UNKNOWN, Metrics, State
from agentgw.pipeline import CallNext, Pipeline

STAGES = ("audit", "authorize", "admitted", "upstream")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def a_call(upstream: str = "github", protocol: str = "mcp") -> Call:
    call = Call("mcp", "call", f"mcp:{upstream}/t", upstream, "tools/call")
    call.protocol = protocol  # type: ignore[assignment]  # the label is what is tested, not the literal
    call.principal = Principal("user:alice")
    return call


def scraped(metrics: Metrics) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def known(protocol: str, name: str) -> bool:
    return name in {"github", "chat"}


def calls(samples: Samples, **labels: str) -> float | None:
    return samples.get(("agentgw_calls_total", frozenset(labels.items())))


def test_an_answered_call_is_counted_allowed_with_each_stage_timed_on_its_own() -> None:
    metrics = Metrics(STAGES, known=known)
    # Inclusive times: audit 10 ms with everything, authorize 8, admitted 6 with the terminal's 4.
    metrics.finished(a_call(), [0.010, 0.008, 0.006, 0.004], Reply())
    samples = scraped(metrics)
    assert (
        calls(samples, protocol="mcp", action="call", upstream="github", decision="allowed", reason="ok") == 1
    )

    def stage_sum(stage: str) -> float:
        return samples[("agentgw_stage_duration_seconds_sum", frozenset({("stage", stage)}))]

    assert [round(stage_sum(s), 6) for s in STAGES] == [0.002, 0.002, 0.002, 0.004]
    upstream = frozenset({("protocol", "mcp"), ("upstream", "github")})
    assert samples[("agentgw_upstream_duration_seconds_sum", upstream)] == 0.004
    # 4 ms lies in the 5 ms bucket, not the 2.5 ms one.
    assert samples[("agentgw_upstream_duration_seconds_bucket", upstream | {("le", "0.0025")})] == 0
    assert samples[("agentgw_upstream_duration_seconds_bucket", upstream | {("le", "0.005")})] == 1


def test_a_refusal_is_denied_and_timed_only_in_the_stages_it_reached() -> None:
    metrics = Metrics(STAGES, known=known)
    metrics.finished(a_call(), [0.003, 0.001, 0.0, 0.0], Forbidden("no"))
    samples = scraped(metrics)
    labels = {"protocol": "mcp", "action": "call", "upstream": "github"}
    assert calls(samples, **labels, decision="denied", reason="denied_by_policy") == 1
    counts = {
        dict(key)["stage"]: value
        for (name, key), value in samples.items()
        if name == "agentgw_stage_duration_seconds_count"
    }
    assert counts == {"audit": 1, "authorize": 1, "admitted": 0, "upstream": 0}
    upstream = frozenset({("protocol", "mcp"), ("upstream", "github")})
    assert samples[("agentgw_upstream_duration_seconds_count", upstream)] == 0


def test_a_call_that_failed_upstream_after_admission_is_allowed_with_the_failure_as_reason() -> None:
    metrics = Metrics(STAGES, known=known)
    metrics.finished(a_call(), [0.02, 0.02, 0.02, 0.02], UpstreamTimeout("slow"))
    metrics.finished(a_call(), [0.02, 0.02, 0.0, 0.0], RuntimeError("bug"))
    samples = scraped(metrics)
    labels = {"protocol": "mcp", "action": "call", "upstream": "github"}
    assert calls(samples, **labels, decision="allowed", reason="upstream_timeout") == 1
    assert calls(samples, **labels, decision="error", reason="internal_error") == 1


def test_a_budget_refusal_is_counted_by_budget_and_metric() -> None:
    metrics = Metrics(STAGES, known=known)
    refused = BudgetExceeded("spent", data={"budget": "per-run", "metric": "tokens"})
    metrics.finished(a_call(), [0.001, 0.001, 0.0, 0.0], refused)
    samples = scraped(metrics)
    assert (
        samples[("agentgw_budget_refusals_total", frozenset({("budget", "per-run"), ("metric", "tokens")}))]
        == 1
    )


def test_an_upstream_name_the_gateway_does_not_define_is_never_a_label_value() -> None:
    metrics = Metrics(STAGES, known=known)
    for n in range(50):
        metrics.finished(a_call(f"made-up-{n}"), [0.001, 0.0, 0.0, 0.0], Forbidden("no"))
    text = metrics.exposition().decode()
    assert "made-up" not in text
    samples = scraped(metrics)
    labels = {"protocol": "mcp", "action": "call", "upstream": UNKNOWN}
    assert calls(samples, **labels, decision="denied", reason="denied_by_policy") == 50


def test_principals_are_labels_only_when_asked_for() -> None:
    quiet, named = Metrics(STAGES, known=known), Metrics(STAGES, known=known, principal_labels=True)
    for metrics in (quiet, named):
        metrics.finished(a_call(), [0.001, 0.0, 0.0, 0.0], Forbidden("no"))
    assert "user:alice" not in quiet.exposition().decode()
    labels = {"protocol": "mcp", "action": "call", "upstream": "github", "decision": "denied"}
    assert calls(scraped(named), **labels, reason="denied_by_policy", principal="user:alice") == 1


async def test_usage_is_counted_when_reported_and_when_a_stream_settles() -> None:
    metrics = Metrics(STAGES, known=known)
    metrics.finished(a_call("chat", "llm"), [0.01, 0.01, 0.01, 0.01], Reply(usage=Usage(tokens=30, cost=0.5)))
    streamed = Reply(streaming=True)
    metrics.finished(a_call("chat", "llm"), [0.01, 0.01, 0.01, 0.01], streamed)
    key = frozenset({("protocol", "llm"), ("upstream", "chat")})
    assert scraped(metrics)[("agentgw_usage_tokens_total", key)] == 30
    await streamed.settle(Usage(tokens=12, cost=0.25))
    samples = scraped(metrics)
    assert samples[("agentgw_usage_tokens_total", key)] == 42
    assert samples[("agentgw_usage_cost_total", key)] == 0.75


def test_the_scrape_reads_upstream_health_the_token_cache_and_the_audit_log() -> None:
    state = State(
        upstreams=lambda: {"upstream 'github'": {"ok": True}, "model 'chat': the provider": {"ok": False}},
        token_cache=lambda: {("github", "hit"): 5, ("github", "miss"): 1},
        audit_backlog=lambda: 7,
        audit_problem=lambda: "the database does not take records",
        audit_commits=lambda: 3,
    )
    samples = scraped(Metrics(STAGES, state=state))
    assert samples[("agentgw_upstream_up", frozenset({("target", "upstream 'github'")}))] == 1
    assert samples[("agentgw_upstream_up", frozenset({("target", "model 'chat': the provider")}))] == 0
    lookups = "agentgw_token_cache_lookups_total"
    assert samples[(lookups, frozenset({("upstream", "github"), ("result", "hit")}))] == 5
    assert samples[(lookups, frozenset({("upstream", "github"), ("result", "miss")}))] == 1
    assert samples[("agentgw_audit_journal_backlog", frozenset())] == 7
    assert samples[("agentgw_audit_refusing", frozenset())] == 1
    assert samples[("agentgw_audit_commits_total", frozenset())] == 3
    assert any(name == "python_gc_objects_collected_total" for name, _ in samples)


async def test_a_pipeline_with_metrics_counts_each_run_under_its_stage_names() -> None:
    async def authorize(call: Call, call_next: CallNext) -> Reply:
        raise Forbidden("no")

    async def terminal(call: Call) -> Reply:
        return Reply()

    pipeline = Pipeline([authorize])
    metrics = Metrics(pipeline.stages, known=known)
    pipeline.observer = metrics
    for _ in range(3):
        with pytest.raises(Forbidden):
            await pipeline.run(a_call(), terminal)
    samples = scraped(metrics)
    assert samples[("agentgw_stage_duration_seconds_count", frozenset({("stage", "authorize")}))] == 3
    labels = {"protocol": "mcp", "action": "call", "upstream": "github", "decision": "denied"}
    assert calls(samples, **labels, reason="denied_by_policy") == 3
