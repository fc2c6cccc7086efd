"""Secrets in tool-call arguments never reach the stored audit record, whatever their shape, and what
is not secret is kept: a corpus of realistic arguments (`data/secret_arguments.json`: DSNs and URLs
with passwords, header lists and maps, name/value pairs, keys and passphrases, tokens in prose and in
JSON text) sent through the audit stage into a real SQL audit log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentgw.call import Call, Principal, Reply
from agentgw.filters.audit import Audit
from agentgw.pipeline import CallNext, ordered
from agentgw.records.audit import AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery, SqlAuditLog, query

CORPUS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "secret_arguments.json").read_text()
)


async def identify(call: Call, call_next: CallNext) -> Reply:
    call.principal = Principal(subject="user:alice")
    return await call_next(call)


async def passing(call: Call, call_next: CallNext) -> Reply:
    return await call_next(call)


async def answer(call: Call) -> Reply:
    return Reply()


async def stored(
    tmp_path: Path, settings: AuditSettings, calls: list[tuple[str, dict[str, Any]]]
) -> list[Any]:
    """Each call's arguments as its stored decision record keeps them, and every stored record."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    log = SqlAuditLog(engine, settings)
    audit = Audit(log, settings.redact)
    stages = ordered(
        audit=audit,
        authenticate=identify,
        authorize=passing,
        budget=passing,
        credentials=passing,
        admitted=audit.admitted,
    )
    for resource, arguments in calls:
        server = resource.split(":")[1].split("/")[0]
        call = Call(
            protocol="mcp",
            action="call",
            resource=resource,
            upstream=server,
            method="tools/call",
            arguments=arguments,
        )
        await stages.run(call, answer)
    log.close()
    records = query(engine, AuditQuery(), limit=10_000)
    engine.dispose()
    return records


@pytest.mark.parametrize("case", CORPUS, ids=[case["about"] for case in CORPUS])
async def test_no_secret_of_the_corpus_survives_in_the_stored_record_and_the_rest_is_kept(
    tmp_path: Path, case: dict[str, Any]
) -> None:
    records = await stored(tmp_path, AuditSettings(), [(case["tool"], case["arguments"])])
    everything = json.dumps(records, ensure_ascii=False)
    for secret in case["secrets"]:
        assert secret not in everything, (secret, records[0]["arguments"])
    [decision] = [r for r in records if r["event"] == "decision"]
    kept = json.dumps(decision["arguments"], ensure_ascii=False)
    for plain in case["kept"]:
        assert plain in kept, (plain, decision["arguments"])
    assert "[REDACTED" in kept or not case["secrets"]


async def test_configured_names_and_patterns_add_to_the_defaults(tmp_path: Path) -> None:
    settings = AuditSettings.model_validate(
        {"redact": {"extra_arguments": ["*ssn*", "iban"], "patterns": [r"\bACCT-\d{6}\b"]}}
    )
    arguments = {
        "customer_ssn": "123-45-6789",
        "IBAN": "DE89370400440532013000",
        "password": "default-still-applies",
        "memo": "pay ACCT-123456 by Friday",
        "amount": 12.5,
    }
    [decision, _] = await stored(tmp_path, settings, [("mcp:bank/pay", arguments)])
    assert decision["arguments"] == {
        "customer_ssn": "[REDACTED]",
        "IBAN": "[REDACTED]",
        "password": "[REDACTED]",
        "memo": "pay [REDACTED:pattern] by Friday",
        "amount": 12.5,
    }
