"""The load generator's request shapes and its judgement of answers."""

from __future__ import annotations

import orjson
import pytest

from bench.load import McpToolCall, percentile, workload


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) == 0.0


def test_a_modern_tool_call_carries_meta_and_the_naming_headers() -> None:
    load = workload("mcp", "http://x/mcp", era="modern", token="t0k")
    assert isinstance(load, McpToolCall)
    body = orjson.loads(load.request(42))
    assert body["id"] == 42 and body["method"] == "tools/call" and body["params"]["name"] == "echo"
    assert body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    assert load.headers["mcp-method"] == "tools/call"
    assert load.headers["mcp-name"] == "echo"
    assert load.headers["authorization"] == "Bearer t0k"


def test_a_legacy_tool_call_has_no_meta_and_no_naming_headers() -> None:
    load = workload("mcp", "http://x/mcp", era="legacy")
    body = orjson.loads(load.request(1))
    assert "_meta" not in body["params"]
    assert "mcp-method" not in load.headers and "authorization" not in load.headers


def test_only_a_successful_answer_to_the_same_id_counts() -> None:
    load = workload("mcp", "http://x/mcp")
    ok = b'{"jsonrpc":"2.0","id":5,"result":{"content":[],"isError":false}}'
    sse = b"event: message\r\ndata: " + ok + b"\r\n\r\n"
    assert load.check(200, "application/json", ok, 5) is None
    assert load.check(200, "text/event-stream", sse, 5) is None
    assert load.check(200, "application/json", ok, 6) is not None
    assert load.check(500, "application/json", ok, 5) is not None
    assert load.check(200, "application/json", b"<html>", 5) is not None
    tool_error = b'{"jsonrpc":"2.0","id":5,"result":{"content":[],"isError":true}}'
    assert load.check(200, "application/json", tool_error, 5) is not None
    rpc_error = b'{"jsonrpc":"2.0","id":5,"error":{"code":-32603,"message":"boom"}}'
    assert "boom" in (load.check(200, "application/json", rpc_error, 5) or "")


def test_a2a_and_llm_answers_are_judged_by_their_own_shapes() -> None:
    a2a = workload("a2a", "http://x/a2a/agent")
    assert orjson.loads(a2a.request(3))["method"] == "SendMessage"
    assert a2a.check(200, "application/json", b'{"jsonrpc":"2.0","id":3,"result":{}}', 3) is None
    llm = workload("llm", "http://x/v1/chat/completions", model="fast")
    assert orjson.loads(llm.request(1))["model"] == "fast"
    assert llm.check(200, "application/json", b'{"choices":[{"index":0}]}', 1) is None
    assert llm.check(200, "application/json", b'{"error":{"message":"no"}}', 1) is not None


def test_unknown_kinds_and_eras_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        workload("grpc", "http://x")  # type: ignore[arg-type]  # the point: a kind that does not exist
    with pytest.raises(ValueError, match="era"):
        workload("mcp", "http://x", era="ancient")  # type: ignore[arg-type]  # likewise
