"""Log lines: text and JSON, with the running call's fields and `extra=` values, and no secrets."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from agentgw.call import Call, Principal, current_call
from agentgw.log_format import LogFormat, LogFormatter

TEXT_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING agentgw\.test ")


@pytest.fixture
def call() -> Iterator[Call]:
    running = Call("mcp", "call", "mcp:github/create_issue", "github", "tools/call")
    running.principal = Principal("user:alice")
    token = current_call.set(running)
    yield running
    current_call.reset(token)


def written(style: LogFormat, message: str, *args: object, **extra: object) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogFormatter(style))
    logger = logging.getLogger("agentgw.test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, *args, extra=extra)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return out.getvalue().rstrip("\n")


def test_a_json_line_names_the_running_call_and_carries_the_extra_fields(call: Call) -> None:
    call.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    line = json.loads(written("json", "upstream %s broke off", "github", agent="triage", attempt=2))
    assert line.pop("time").endswith("Z")
    assert line == {
        "level": "WARNING",
        "logger": "agentgw.test",
        "message": "upstream github broke off",
        "request_id": call.request_id,
        "principal": "user:alice",
        "protocol": "mcp",
        "resource": "mcp:github/create_issue",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "agent": "triage",
        "attempt": 2,
    }


def test_a_text_line_carries_the_same_fields_as_key_value_pairs(call: Call) -> None:
    line = written("text", "upstream broke off", url="http://up.example/mcp", note="two words")
    assert TEXT_START.match(line)
    assert line.endswith(
        f"upstream broke off request_id={call.request_id} principal=user:alice protocol=mcp "
        'resource=mcp:github/create_issue url=http://up.example/mcp note="two words"'
    )


def test_outside_a_call_a_line_has_no_call_fields() -> None:
    line = json.loads(written("json", "policy reloaded"))
    assert set(line) == {"time", "level", "logger", "message"}
    assert written("text", "policy reloaded").endswith("agentgw.test policy reloaded")


def test_a_caller_chosen_value_cannot_forge_a_text_line(call: Call) -> None:
    call.resource = "mcp:github/x\n2026-01-01 00:00:00,000 ERROR agentgw forged"
    line = written("text", "seen")
    assert "\n" not in line
    assert 'resource="mcp:github/x\\n2026-01-01 00:00:00,000 ERROR agentgw forged"' in line


def test_an_extra_field_cannot_replace_the_lines_own_fields() -> None:
    line = json.loads(written("json", "real message", level="FAKE"))
    assert line["level"] == "WARNING" and line["message"] == "real message"


@pytest.mark.parametrize("style", ["text", "json"])
def test_credentials_in_a_message_an_extra_or_a_traceback_are_replaced(style: LogFormat) -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    try:
        raise ValueError(f"token endpoint answered 400 for Bearer {jwt}")
    except ValueError:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(LogFormatter(style))
        logger = logging.getLogger("agentgw.test.secrets")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.exception(
                "exchange failed for %s", jwt, extra={"url": "https://bot:hunter2@idp.example/token"}
            )
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
    text = out.getvalue()
    assert "ValueError" in text  # the traceback is there...
    assert jwt not in text and "c2lnbmF0dXJl" not in text  # ...without the token
    assert "hunter2" not in text and "https://bot:" in text
