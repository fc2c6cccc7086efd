"""What a hostile caller can do to the audit trail through a real gateway: forge lines of it as
auditors read it (`agentgw audit query|tail`, JSON lines), send run ids that are not ones, and bloat
it with huge methods, resources, session and task ids and arguments.

One gateway process in front of the MCP fixture (`/mcp/tools` passed through, `/mcp` bridged), the
A2A echo agent and the OpenAI-compatible fixture; anonymous callers may use `mcp:tools/echo`,
`a2a:echo/*` and `llm:chat`, nothing else.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine

from agentgw.call import Call, Principal, Reply
from agentgw.cli import main
from agentgw.cli.audit import TABLE_COLUMNS
from agentgw.errors import Forbidden
from agentgw.filters.audit import Audit
from agentgw.pipeline import CallNext, ordered
from agentgw.records.audit import RECORD_MAX_BYTES, AuditSettings
from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery, SqlAuditLog, query, verify
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import free_port, start_process
from conformance.fixtures.openai_upstream import start_openai_upstream_sync
from tests.support.audit import records_until
from tests.support.gateway import gateway_args, write_config
from tests.support.mcp import META, modern_headers

TIMEOUT = 20.0
A2A = {"a2a-version": "1.0"}
MESSAGE = {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}
# A denied request's resource that, printed raw, ends the table's row and starts a forged one in
# which another user was allowed another tool; then a line erase, a C1 CSI, DEL, a bidi override.
FORGED_ROW = "\t".join(
    ["9999", "2026-01-01T00:00:00.000000Z", "decision", "allowed", "user:root", "call", "mcp:tools/drop_db"]
)
FORGED_URI = f"file:///notes\n{FORGED_ROW}\tok\trun-1\x1b[2K\x9b31m\x7f\u202eevil\u2066"
UNSHOWABLE = ("\n", "\r", "\x1b", "\x9b", "\x7f", "\u202e", "\u2066", "\u200b")


@dataclass
class Setup:
    url: str
    database_url: str
    engine: Engine

    def mcp(self, server: str | None = None) -> str:
        return f"{self.url}/mcp/{server}" if server else f"{self.url}/mcp"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("audit-trail")
    agents_port, port = free_port(), free_port()
    agents = f"http://127.0.0.1:{agents_port}"
    with ExitStack() as stack:
        llm = stack.enter_context(start_openai_upstream_sync())
        stack.enter_context(start_process(agents_args(["echo"], agents_port), agents_port))
        key = tmp / "route.key"
        key.write_text("route-secret")
        config = {
            "allow_anonymous": True,
            "servers": [{"name": "tools", "url": f"{modern_upstream}/mcp"}],
            "a2a_agents": [
                {
                    "name": "echo",
                    "card_url": f"{agents}/echo/.well-known/agent-card.json",
                    "default_skill": "echo",
                }
            ],
            "secrets": {"llm-key": {"file": str(key)}},
            "llm_routes": [
                {
                    "name": "chat",
                    "base_url": f"{llm}/v1",
                    "model": "fixture-chat",
                    "credential": {"mode": "static", "secret": "llm-key"},
                }
            ],
            "policy": {
                "rules": [
                    "p, anonymous, mcp:tools/echo, *, allow",
                    "p, anonymous, a2a:echo/*, *, allow",
                    "p, anonymous, llm:chat, *, allow",
                ]
            },
            "budgets": {"rules": [{"name": "per-run", "per": "run", "calls": 1000}]},
        }
        database_url = f"sqlite:///{tmp / 'agentgw.db'}"
        process = stack.enter_context(
            start_process(gateway_args(write_config(tmp, config), port, database_url), port)
        )
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        yield Setup(process.url, database_url, engine)


def mcp_request(
    method: str, params: dict[str, Any], name: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": method,
        "params": {**params, "_meta": {**META, **params.get("_meta", {})}},
    }
    return body, modern_headers(method, name)


async def echo_with_run(gateway: Setup, run: str) -> None:
    """An allowed call in run `run`: once its record is in the log, so is every record before it."""
    body, headers = mcp_request("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, "echo")
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.post(gateway.mcp("tools"), json=body, headers=headers | {"agent-run-id": run})
    assert answer.status_code == 200, answer.text
    await records_until(gateway.engine, AuditQuery(run_id=run), lambda records: len(records) == 2)


def every_record(gateway: Setup) -> str:
    return json.dumps(query(gateway.engine, AuditQuery(), limit=100_000))


# --- forged lines -----------------------------------------------------------------------------------


async def test_a_denied_request_cannot_forge_a_row_of_the_audit_table_or_reach_the_terminal(
    gateway: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    body, headers = mcp_request("resources/read", {"uri": f"{FORGED_URI}{tag}"})
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.post(gateway.mcp("tools"), json=body, headers=headers)
    assert answer.json()["error"]["message"].startswith("denied by policy")
    await echo_with_run(gateway, f"after-{uuid.uuid4().hex}")
    resource = f"mcp:tools/resource/{FORGED_URI}{tag}"
    # The resource filter takes a prefix: the one row whose resource begins as the forged one's does.
    prefix = ["--resource", "mcp:tools/resource/file:///notes*", "--database-url"]
    for command in (["query"], ["tail", "-n", "1"]):
        assert main(["audit", *command, *prefix, gateway.database_url]) == 0
        out = capsys.readouterr().out
        assert not any(char in out for char in UNSHOWABLE if char != "\n"), out
        header, row, *rest = out.split("\n")
        assert rest == [""], out  # one row, then the final newline: nothing forged after it
        cells = row.split("\t")
        assert len(cells) == len(TABLE_COLUMNS) == len(header.split("\t"))
        shown = dict(zip(TABLE_COLUMNS, cells, strict=True))
        assert (shown["decision"], shown["subject"], shown["action"]) == ("denied", "anonymous", "read")
        assert shown["resource"].startswith("mcp:tools/resource/file:///notes\\n9999\\t2026")
        assert "\\u001b[2K\\u009b31m\\u007f\\u202eevil\\u2066" in shown["resource"]
    assert main(["audit", "query", "--format", "jsonl", *prefix, gateway.database_url]) == 0
    out = capsys.readouterr().out
    assert not any(char in out for char in UNSHOWABLE if char != "\n"), out
    [line] = out.splitlines()
    assert json.loads(line)["resource"] == resource  # escaped for the eye, the same value for programs


@pytest.mark.parametrize(
    ("where", "run"),
    [
        ("mcp _meta", "run-1\n9999\tforged"),
        ("mcp _meta", "r" * 129),
        ("mcp _meta", "\x1b[31mred"),
        ("mcp header", "run id with spaces"),
        ("mcp header", "x" * 200),
        ("bridge _meta", "run\u202e1"),
        ("bridge header", "<script>"),
        ("a2a header", "run;1"),
        ("a2a contextId", "ctx\n1"),
        ("a2a rest contextId", "ctx\u200b1"),
        ("llm header", "run|1"),
    ],
)
async def test_a_run_id_that_is_not_one_is_refused_before_anything_is_recorded(
    gateway: Setup, where: str, run: str
) -> None:
    tag = f"tag{uuid.uuid4().hex[:10]}"
    run = f"{run}{tag}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=TIMEOUT) as http:
        if where.startswith(("mcp", "bridge")):
            url = gateway.mcp("tools" if where.startswith("mcp") else None)
            name = "echo" if where.startswith("mcp") else "tools__echo"
            in_meta = where.endswith("_meta")
            meta = {"io.agentgw/runId": run} if in_meta else {}
            body, headers = mcp_request("tools/call", {"name": name, "arguments": {}, "_meta": meta}, name)
            answer = await http.post(
                url, json=body, headers=headers | ({} if in_meta else {"agent-run-id": run})
            )
            error = answer.json()["error"]
            assert (error["code"], answer.status_code in (200, 400)) == (-32602, True), answer.text
        elif where == "a2a header":
            body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": MESSAGE}}
            answer = await http.post("/a2a/echo", json=body, headers=A2A | {"agent-run-id": run})
            assert answer.json()["error"]["code"] == -32602, answer.text
        elif where == "a2a contextId":
            message = MESSAGE | {"contextId": run}
            body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
            answer = await http.post("/a2a/echo", json=body, headers=A2A)
            assert answer.json()["error"]["code"] == -32602, answer.text
        elif where == "a2a rest contextId":
            answer = await http.post(
                "/a2a/echo/message:send", json={"message": MESSAGE | {"contextId": run}}, headers=A2A
            )
            assert answer.status_code == 400, answer.text
        else:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            answer = await http.post("/v1/chat/completions", json=body, headers={"agent-run-id": run})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "invalid run id" in answer.text and tag not in answer.text
    await echo_with_run(gateway, f"after-{uuid.uuid4().hex}")
    assert tag not in every_record(gateway)


async def test_valid_run_ids_of_every_usual_shape_are_taken(gateway: Setup) -> None:
    for run in (str(uuid.uuid4()), "01J9ZQ3V5W8Y2K4M6N8P0R2T4V", "urn:run:build/42@ci.example", "a" * 128):
        await echo_with_run(gateway, run)


# --- bloat --------------------------------------------------------------------------------------------


def stored_rows(database_url: str, tag: str) -> list[dict[str, Any]]:
    """The stored rows holding `tag` anywhere, as the database has them (every column)."""
    path = database_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log")]
    return [row for row in rows if any(tag in str(value) for value in row.values())]


async def test_no_request_makes_a_record_larger_than_the_bound_and_the_log_still_verifies(
    gateway: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"tag{uuid.uuid4().hex[:10]}"
    mega = tag + "m" * (1 << 20)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=TIMEOUT) as http:
        sent = []
        # A 1 MB method name, from a caller with no grant for it.
        body, headers = mcp_request(mega, {})
        del headers["mcp-method"]
        sent.append(await http.post(gateway.mcp("tools"), json=body, headers=headers))
        # A 1 MB resource URI.
        body, headers = mcp_request("resources/read", {"uri": mega})
        sent.append(await http.post(gateway.mcp("tools"), json=body, headers=headers))
        # 1 MB of arguments in many short strings (each is under the per-string cap).
        arguments = {"items": [f"{tag}-{n:06d}" for n in range(60_000)]}
        body, headers = mcp_request("tools/call", {"name": "echo", "arguments": arguments}, "echo")
        sent.append(await http.post(gateway.mcp("tools"), json=body, headers=headers))
        # A 60 KB task id (stored as the session id).
        task = tag + "t" * 60_000
        rpc = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": task}}
        sent.append(await http.post("/a2a/echo", json=rpc, headers=A2A))
        # A 1 MB prompt to the LLM route: the body is its arguments.
        chat = {"model": "chat", "messages": [{"role": "user", "content": mega}] * 2}
        sent.append(await http.post("/v1/chat/completions", json=chat, headers={"agent-run-id": tag}))
    assert all(answer.status_code < 500 for answer in sent), [a.text[:200] for a in sent]
    await echo_with_run(gateway, f"after-{uuid.uuid4().hex}")
    rows = stored_rows(gateway.database_url, tag)
    # Which columns of each decision record were cut (the 1 MB method shows as its first characters).
    cut = {
        row["method"][:20]: sorted(k for k, v in row.items() if isinstance(v, str) and "…[truncated " in v)
        for row in rows
        if row["event"] == "decision"
    }
    assert cut == {
        mega[:20]: ["method", "resource"],
        "resources/read": ["resource"],
        "tools/call": ["arguments"],
        "GetTask": ["session_id"],
        "chat.completions": ["arguments"],
    }
    for row in rows:
        size = len(orjson.dumps({k: v for k, v in row.items() if k not in ("id", "hash")}))
        assert size <= RECORD_MAX_BYTES, (size, row["method"][:60], row["resource"][:60])
        assert size <= 16 * 1024, size  # a request's own strings are ASCII here: far under the bound
    # The gateway's own config: verify holds the chains to the checkpoints in its data directory.
    config = str(Path(gateway.database_url.removeprefix("sqlite:///")).parent / "gateway.yaml")
    assert main(["audit", "verify", "--config", config, "--database-url", gateway.database_url]) == 0
    assert "ok:" in capsys.readouterr().out
    assert tag in every_record(gateway)  # readers still parse every record (the arguments too)


class Hostile:
    """Plays every stage before audit: a principal whose every name is huge, then a refusal whose
    text is huge (a token issuer and an upstream's error text are not the caller's, but are not
    trusted to be small either)."""

    def __init__(self, filler: str) -> None:
        self.filler = filler

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        huge = self.filler * 100_000
        names = tuple(huge[:1000] for _ in range(1000))
        call.principal = Principal(
            subject=huge,
            client_id=huge,
            roles=names,
            scopes=frozenset(f"{n}{huge[:500]}" for n in range(1000)),
            actors=names,
        )
        call.upstream_actors = names
        call.credential_mode = "token_exchange"
        call.decided_by = "p, anonymous, mcp:*, call, deny"
        raise Forbidden(huge)


async def refuse(call: Call, call_next: CallNext) -> Reply:
    raise AssertionError("the hostile stage refuses every call")


async def never(call: Call) -> Reply:
    raise AssertionError("a refused call is never forwarded")


@pytest.mark.parametrize(
    ("filler", "in_arguments", "pieces"),
    [(c, c, 1000) for c in ("\x01", '"', "\\", "\U0001f600", "\u202e", "m")]
    + [("\x01", "\U0001f600", 4), ("\x01", "\U0001f600", 1000), ("\x01", '"', 1000), ("\x01", "\\", 1000)],
)
async def test_the_largest_record_any_request_can_make_is_under_the_bound(
    tmp_path: Path, filler: str, in_arguments: str, pieces: int
) -> None:
    # Every string the call carries is 100,000 of a character that JSON or UTF-8 grows most: one in
    # the plain columns (a C0 control is 6 bytes in JSON), another in the arguments, which are
    # either just under their cap (4 strings of 1000 emoji: 16 KB in UTF-8) or far over it.
    huge = filler * 100_000
    wide = in_arguments * 100_000
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    log = SqlAuditLog(engine, AuditSettings(node_id="node"))
    audit = Audit(log)
    call = Call(
        protocol="mcp",
        action="call",
        resource=huge,
        upstream=huge,
        method=huge,
        run_id=huge,
        session_id=huge,
        arguments={str(n): wide[:1000] for n in range(pieces)},
    )
    stages = ordered(
        audit=audit,
        authenticate=Hostile(filler),
        authorize=refuse,
        budget=refuse,
        credentials=refuse,
        admitted=audit.admitted,
    )
    with pytest.raises(Forbidden):
        await stages.run(call, never)
    log.close()
    engine.dispose()
    with closing(sqlite3.connect(tmp_path / "audit.db")) as conn:
        conn.row_factory = sqlite3.Row
        [row] = [dict(r) for r in conn.execute("SELECT * FROM audit_log")]
    hashed = orjson.dumps(
        {k: v for k, v in row.items() if k not in ("id", "hash")}, option=orjson.OPT_SORT_KEYS
    )
    assert len(hashed) <= RECORD_MAX_BYTES, len(hashed)
    assert len(hashed) > RECORD_MAX_BYTES // 8  # every field did hold what it was given, up to its cap
    assert verify(make_engine(f"sqlite:///{tmp_path / 'audit.db'}")).ok
