"""Structured logs end to end: a real gateway process with `log_format: json`, called with the official
`openai` client; its log lines parse, name the call they were written in (as the audit log has it),
and hold none of the secrets the run handled."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx2
import openai
import pytest

from conformance.fixtures.launch import free_port
from conformance.fixtures.openai_upstream import start_openai_upstream_sync
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.tokens import token

ROUTE_SECRET = "logs-route-secret-7f3a"
AUDIT_WAIT_S = 10.0
# A line in the text format (`2026-01-01 12:00:00,000 INFO agentgw...`) or uvicorn's own.
TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |(INFO|WARNING|ERROR|DEBUG): )")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with start_openai_upstream_sync() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gw")
    key = tmp / "route.key"
    key.write_text(ROUTE_SECRET)
    credential = {"mode": "static", "secret": "route-key"}
    config = {
        "log_format": "json",
        "log_level": "DEBUG",
        "secrets": {"route-key": {"file": str(key)}},
        "llm_routes": [
            {"name": "chat", "base_url": f"{upstream}/v1", "model": "fixture-chat", "credential": credential},
            # Nothing listens there: the gateway logs the failure while it runs the call.
            {
                "name": "down",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "model": "fixture-chat",
                "credential": credential,
            },
        ],
        "policy": {"rules": ["p, user:alice, llm:*, *, allow"]},
    }
    with run_gateway(tmp, config) as gw:
        yield gw


def audit_records(gateway: RunningGateway, request_id: str) -> list[dict[str, Any]]:
    path = gateway.database_url.removeprefix("sqlite:///")
    deadline = time.monotonic() + AUDIT_WAIT_S
    while True:
        with closing(sqlite3.connect(path)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM audit_log WHERE request_id = ?", (request_id,)).fetchall()
        if len(rows) == 2:  # the decision and the outcome
            return [dict(row) for row in rows]
        assert time.monotonic() < deadline, f"no audit records for {request_id}"
        time.sleep(0.05)  # polling the committed log: group commits land within milliseconds


def log_lines(gateway: RunningGateway) -> list[dict[str, Any]]:
    lines = []
    for line in gateway.output().splitlines():
        assert not TEXT_LINE.match(line), f"a log line not in JSON: {line}"
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_log_lines_name_the_call_the_audit_log_records_and_hold_no_secret(
    gateway: RunningGateway,
) -> None:
    bearer = token(gateway, "alice", "/v1")
    with (
        httpx2.Client(timeout=20) as http,
        openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=bearer, http_client=http, max_retries=0
        ) as client,
    ):
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "echo: hi"
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="down", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + AUDIT_WAIT_S
    while not any(line["message"].startswith("LLM route down failed") for line in log_lines(gateway)):
        assert time.monotonic() < deadline, gateway.output()
        time.sleep(0.05)  # polling the process's output for the line it writes
    lines = log_lines(gateway)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    failed = next(line for line in lines if line["message"].startswith("LLM route down failed"))
    assert failed["level"] == "WARNING" and failed["logger"] == "agentgw.ingress.llm"
    assert failed["principal"] == "user:alice"
    assert failed["protocol"] == "llm" and failed["resource"] == "llm:down"
    records = audit_records(gateway, failed["request_id"])
    assert {r["resource"] for r in records} == {"llm:down"}
    assert {r["subject"] for r in records} == {"user:alice"}
    # None of the run's secrets: the caller's token, the upstream's key, the signing key.
    output = gateway.output()
    pem = json.loads(gateway.signing_keys.read_text())["keys"][0]["private_pem"]
    key_body = "".join(pem.strip().splitlines()[1:-1])
    assert bearer not in output and bearer.split(".")[2] not in output
    assert ROUTE_SECRET not in output
    assert all(part not in output for part in pem.strip().splitlines()[1:-1])
    assert key_body not in output
