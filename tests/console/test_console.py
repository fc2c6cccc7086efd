"""The console over HTTP: the login flow through the built-in authorization server (code + PKCE),
the session cookie, the grant behind each page, CSRF on every POST, escaping of hostile audit data
and the security headers. A gateway served by uvicorn, driven by httpx as a browser would be."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from agentgw.app import GatewayApp, create_app
from agentgw.records.audit import AuditRecord, timestamp
from agentgw.settings import load_settings
from tests.console.support import HOSTILE, PASSWORD, console_config
from tests.support.servers import LocalServer


@dataclass
class Running:
    app: GatewayApp
    url: str


@asynccontextmanager
async def gateway(tmp_path: Path, **extra: Any) -> AsyncIterator[Running]:
    front = LocalServer()
    settings = load_settings(
        None,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'gw.db'}",
        public_url=front.url,
        **console_config(**extra),
    )
    app = create_app(settings)
    async with front.serve(app):
        yield Running(app, front.url)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Running]:
    async with gateway(tmp_path) as running:
        yield running


@asynccontextmanager
async def login(gw: Running, user: str, password: str = PASSWORD) -> AsyncIterator[httpx.AsyncClient]:
    """A client (with its cookie jar) that went through the console's login as `user`."""
    async with httpx.AsyncClient(base_url=gw.url, follow_redirects=False) as http:
        start = await http.get("/console")
        assert start.status_code == 303 and start.headers["location"] == "/console/login"
        to_server = await http.get("/console/login")
        assert to_server.status_code == 303
        authorize = to_server.headers["location"]
        params = dict(parse_qsl(urlsplit(authorize).query))
        assert params["code_challenge_method"] == "S256" and params["client_id"] == "agentgw-console"
        page = await http.get(authorize)
        assert page.status_code == 200
        hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)
        form = {k: html.unescape(v) for k, v in hidden} | {"username": user, "password": password}
        signed_in = await http.post("/oauth/authorize", data=form)
        if signed_in.status_code == 302:
            back = signed_in.headers["location"]
            assert back.startswith(f"{gw.url}/console/callback?")
            done = await http.get(back.removeprefix(gw.url))
            assert done.status_code == 303 and done.headers["location"] == "/console"
        yield http


async def record(gw: Running, *, run_id: str, subject: str, resource: str, city: str) -> None:
    """A denied call's record, written through the gateway's own audit log (the chain stays whole):
    the console must not trust what the log holds, whatever checked it on the way in."""
    await gw.app.state.gateway.audit_log.write(
        AuditRecord(
            time=timestamp(time.time()),
            event="decision",
            request_id=f"r-{run_id}",
            protocol="mcp",
            action="call",
            resource=resource,
            method="tools/call",
            upstream="demo",
            decision="denied",
            run_id=run_id,
            subject=subject,
            reason="denied_by_policy",
            arguments=orjson.dumps({"city": city}).decode(),
        )
    )


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)


async def test_a_user_logs_in_with_pkce_and_gets_an_httponly_strict_session(gw: Running) -> None:
    async with login(gw, "admin") as http:
        cookie = next(c for c in http.cookies.jar if c.name == "agentgw_console")
        assert cookie.path == "/console" and cookie.has_nonstandard_attr("HttpOnly")
        assert (cookie.get_nonstandard_attr("SameSite") or "").lower() == "strict"
        assert not cookie.secure  # http on loopback; https gets Secure (base URL decides)
        home = await http.get("/console")
    assert home.status_code == 200 and "Signed in as user:admin" in home.text
    for title in ("Audit explorer", "Policy workbench", "Registry", "Budgets"):
        assert title in home.text


async def test_a_wrong_password_gets_no_session(gw: Running) -> None:
    async with login(gw, "admin", "wrong") as http:
        assert "agentgw_console" not in {c.name for c in http.cookies.jar}
        assert (await http.get("/console")).status_code == 303


async def test_a_callback_with_a_state_not_from_this_browser_is_refused(gw: Running) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        await http.get("/console/login")  # this browser's state is in its cookie
        forged = await http.get("/console/callback", params={"code": "stolen", "state": "attacker"})
    assert forged.status_code == 400 and "agentgw_console" not in forged.headers.get("set-cookie", "")


async def test_each_page_needs_the_grant_of_its_admin_api(gw: Running) -> None:
    async with login(gw, "auditor") as http:
        assert (await http.get("/console/audit")).status_code == 200
        for page, grant in (
            ("/console/policies", "read on admin:policies"),
            ("/console/registry", "read on admin:registry"),
            ("/console/budgets", "read on admin:budgets"),
        ):
            refused = await http.get(page)
            assert refused.status_code == 403 and grant in refused.text
        home = await http.get("/console")
    assert "Audit explorer" in home.text and "Policy workbench" not in home.text
    async with login(gw, "nobody") as http:
        assert (await http.get("/console/audit")).status_code == 403
        assert (await http.get("/console/audit/export")).status_code == 403


async def test_a_forged_or_stale_cookie_is_sent_to_the_login(gw: Running) -> None:
    async with httpx.AsyncClient(base_url=gw.url, cookies={"agentgw_console": "not-a-token"}) as http:
        answer = await http.get("/console/audit")
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"


async def test_posts_without_the_sessions_csrf_token_are_refused(gw: Running) -> None:
    cases = "- {subject: user:auditor, object: admin:audit, action: read, expect: allow}"
    async with login(gw, "security") as http:
        page = await http.get("/console/policies")
        for sent in ({}, {"csrf": "0" * 64}):
            refused = await http.post("/console/policies/test", data={"cases": cases, **sent})
            assert refused.status_code == 403
        ran = await http.post("/console/policies/test", data={"cases": cases, "csrf": csrf_of(page.text)})
        assert ran.status_code == 200 and 'class="pass"' in ran.text
        assert (await http.post("/console/logout", data={})).status_code == 403
        assert (await http.get("/console/policies")).status_code == 200  # still signed in
        out = await http.post("/console/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 200
        assert (await http.get("/console/policies")).status_code == 303


async def test_the_policy_workbench_explains_a_decision_and_runs_cases(gw: Running) -> None:
    async with login(gw, "security") as http:
        checked = await http.get(
            "/console/policies", params={"subject": "user:auditor", "object": "admin:audit", "action": "read"}
        )
        assert "Allowed" in checked.text and "p, role:auditor, admin:audit, read, allow" in checked.text
        denied = await http.get(
            "/console/policies",
            params={"subject": "user:auditor", "object": "admin:policies", "action": "read"},
        )
        assert "Denied" in denied.text and "default deny" in denied.text
        page = await http.get("/console/policies")
        failing = "- {subject: user:nobody, object: admin:audit, action: read, expect: allow, name: wrong}"
        ran = await http.post("/console/policies/test", data={"cases": failing, "csrf": csrf_of(page.text)})
        assert 'class="fail"' in ran.text and "expected allow, got deny" in ran.text
        bad = await http.post("/console/policies/test", data={"cases": "{{{", "csrf": csrf_of(page.text)})
        assert bad.status_code == 400 and "not YAML" in bad.text


async def test_hostile_audit_data_is_shown_inert_and_every_page_carries_a_strict_csp(gw: Running) -> None:
    await record(gw, run_id=HOSTILE, subject=HOSTILE, resource=f"mcp:demo/{HOSTILE}", city=HOSTILE)
    async with login(gw, "auditor") as http:
        pages = [
            await http.get("/console/audit"),
            await http.get("/console/audit", params={"run_id": HOSTILE}),
            await http.get("/console/audit/run", params={"run_id": HOSTILE}),
        ]
    for page in pages:
        assert page.status_code == 200
        assert "<script" not in page.text and "<img" not in page.text
        assert "\u202e" not in page.text and "\x1b" not in page.text
        assert "&lt;script&gt;" in page.text and "\\u202e" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"


async def test_the_audit_export_is_the_filtered_records_as_json_lines(gw: Running) -> None:
    await record(gw, run_id="run-42", subject="user:a", resource="mcp:demo/get_weather", city="Oslo")
    await record(gw, run_id="run-43", subject="user:b", resource="mcp:demo/get_weather", city="Rome")
    async with login(gw, "auditor") as http:
        export = await http.get("/console/audit/export", params={"run_id": "run-42"})
        verify = await http.get("/console/audit/verify")
    assert export.headers["content-disposition"].startswith("attachment;")
    lines = [orjson.loads(line) for line in export.text.splitlines()]
    assert lines and {line["run_id"] for line in lines} == {"run-42"}
    assert verify.status_code == 200 and "Intact" in verify.text


async def test_an_operator_sees_the_registry_and_a_runs_budget_use(gw: Running) -> None:
    async with login(gw, "operator") as http:
        registry = await http.get("/console/registry")
        budgets = await http.get("/console/budgets", params={"subject": "user:alice", "run": "r-1"})
        assert (await http.get("/console/audit")).status_code == 403
    assert registry.status_code == 200 and 'id="servers"' in registry.text and 'id="health"' in registry.text
    assert budgets.status_code == 200 and "per-run" in budgets.text and 'id="use"' in budgets.text


async def decision(
    gw: Running, request_id: str, subject: str, resource: str, rule: str, *, roles: tuple[str, ...] = ()
) -> None:
    """A recorded policy decision, as the authorize stage writes one."""
    denied = rule.endswith(", deny")
    await gw.app.state.gateway.audit_log.write(
        AuditRecord(
            time=timestamp(time.time()),
            event="decision",
            request_id=request_id,
            protocol="mcp",
            action="call",
            resource=resource,
            method="tools/call",
            upstream="demo",
            decision="denied" if denied else "allowed",
            subject=subject,
            roles=roles,
            reason="denied_by_policy" if denied else None,
            rule=rule,
        )
    )


CANDIDATE = """# let developers delete, and bob too; carol loses mcp:other
p, role:dev, mcp:demo/*, call, allow
p, user:bob, mcp:demo/delete_repo, call, allow
"""


async def test_a_replay_shows_exactly_the_recorded_decisions_a_candidate_would_change(gw: Running) -> None:
    await decision(
        gw,
        "r-1",
        "user:alice",
        "mcp:demo/get_weather",
        "p, role:dev, mcp:demo/*, call, allow",
        roles=("role:dev",),
    )
    await decision(
        gw,
        "r-2",
        "user:alice",
        "mcp:demo/delete_repo",
        "p, *, mcp:demo/delete_repo, *, deny",
        roles=("role:dev",),
    )
    await decision(gw, "r-3", "user:bob", "mcp:demo/delete_repo", "p, *, mcp:demo/delete_repo, *, deny")
    await decision(gw, "r-4", "user:carol", "mcp:other/lookup", "p, user:carol, mcp:other/*, call, allow")
    async with login(gw, "admin") as http:
        page = await http.get("/console/policies")
        form = {"candidate": CANDIDATE, "since": "1h", "csrf": csrf_of(page.text)}
        ran = await http.post("/console/policies/replay", data=form)
        nothing = await http.post("/console/policies/replay", data=form | {"since": "2999-01-01T00:00:00Z"})
    assert ran.status_code == 200, ran.text
    assert "4 recorded decision(s) since" in ran.text
    assert "3 would change (allowed → denied: 1, denied → allowed: 2)" in ran.text
    rows = re.findall(
        r'<tr class="(\w+)"><td>[^<]*</td><td>([^<]*)</td><td>call</td><td>([^<]*)</td>', ran.text
    )
    assert sorted(rows) == [
        ("narrowing", "user:carol", "mcp:other/lookup"),
        ("widening", "user:alice", "mcp:demo/delete_repo"),
        ("widening", "user:bob", "mcp:demo/delete_repo"),
    ]
    counts = dict(re.findall(r"<tr><td>([^<]*)</td><td>(\w+ → \w+</td><td>\d+)</td></tr>", ran.text))
    assert counts == {
        "user:alice": "denied → allowed</td><td>1",
        "user:bob": "denied → allowed</td><td>1",
        "user:carol": "allowed → denied</td><td>1",
        "mcp:demo/delete_repo": "denied → allowed</td><td>2",
        "mcp:other/lookup": "allowed → denied</td><td>1",
    }
    assert "<code>p, user:bob, mcp:demo/delete_repo, call, allow</code>" in ran.text  # the new deciding rule
    assert nothing.status_code == 200 and "0 recorded decision(s)" in nothing.text


async def test_a_replay_needs_the_policy_and_the_audit_grant_and_the_forms_token(gw: Running) -> None:
    async with login(gw, "security") as http:  # policies, not audit
        page = await http.get("/console/policies")
        assert "Replaying needs read on admin:audit" in page.text
        form = {"candidate": CANDIDATE, "csrf": csrf_of(page.text)}
        refused = await http.post("/console/policies/replay", data=form)
        assert refused.status_code == 403 and "read on admin:audit" in refused.text
    async with login(gw, "auditor") as http:  # audit, not policies
        refused = await http.post("/console/policies/replay", data={"candidate": CANDIDATE})
        assert refused.status_code == 403 and "read on admin:policies" in refused.text
    async with login(gw, "admin") as http:
        for sent in ({}, {"csrf": "0" * 64}):
            forged = await http.post("/console/policies/replay", data={"candidate": CANDIDATE, **sent})
            assert forged.status_code == 403 and 'id="replay"' not in forged.text


async def test_a_pasted_candidate_is_size_capped_validated_and_shown_inert(gw: Running) -> None:
    async with login(gw, "admin") as http:
        csrf = csrf_of((await http.get("/console/policies")).text)

        async def replay(candidate: str, since: str = "7d") -> httpx.Response:
            return await http.post(
                "/console/policies/replay", data={"candidate": candidate, "since": since, "csrf": csrf}
            )

        malformed = await replay(f"p, {HOSTILE}, mcp:demo/*, call, allow")
        odd = await replay("p, user:<img/src=x/onerror=alert`1`>\u202e, mcp<b>demo/x, call, allow")
        too_big = await replay("# x\n" * 20_000)
        empty = await replay("# nothing\n")
        bad_since = await replay(CANDIDATE, since="<script>")
    assert malformed.status_code == 400 and "candidate:1: bad field" in malformed.text
    assert odd.status_code == 200 and 'id="findings"' in odd.text and "can never match" in odd.text
    for page in (malformed, odd, bad_since):
        assert "<script" not in page.text and "<img" not in page.text and "<b>" not in page.text
        assert "&lt;" in page.text
    assert "\\u202e" in odd.text.split('id="findings"')[1]  # the finding quotes the rule printable
    assert too_big.status_code == 400 and "longer than 65536 bytes" in too_big.text
    assert len(too_big.content) < 64 * 1024  # not echoed back
    assert empty.status_code == 400 and "the candidate has no rules" in empty.text
    assert bad_since.status_code == 400 and "since:" in bad_since.text


# --- registry approvals ---


def lookup(city: str) -> str:
    return f"{city}: ok"


@pytest.fixture
async def pinned(tmp_path: Path) -> AsyncIterator[Running]:
    """A gateway in front of a real MCP server whose new tools wait for an administrator's approval."""
    upstream = MCPServer("weather")
    upstream.add_tool(lookup, name="lookup", description="Look a city up.")
    local = LocalServer()
    async with local.serve(upstream.streamable_http_app(host="127.0.0.1")):
        servers = [{"name": "demo", "url": f"{local.url}/mcp", "pinning": "approve"}]
        async with gateway(tmp_path, servers=servers) as running:
            yield running


async def call_lookup(gw: Running) -> str:
    async with Client(f"{gw.url}/mcp/demo", mode="legacy") as client:
        await client.list_tools()  # the gateway sees (and pins) the server's tools
        try:
            result = await client.call_tool("lookup", {"city": "Oslo"})
        except MCPError as exc:
            return f"error: {exc}"
        return str(result.content[0].text)  # type: ignore[union-attr]


async def test_approving_a_waiting_tool_on_the_registry_page_makes_it_callable(pinned: Running) -> None:
    gw = pinned
    assert await call_lookup(gw) == "error: tool 'lookup' of server 'demo' is waiting for approval"
    approve = {"server": "demo", "kind": "tool", "tool": "lookup"}
    async with login(gw, "operator") as http:  # reads the registry, may not approve
        page = await http.get("/console/registry")
        assert re.search(r'<tr class="pending"><td>demo</td><td>tool</td><td>lookup</td>', page.text)
        assert "Approve</button>" not in page.text
        refused = await http.post("/console/registry/approve", data=approve | {"csrf": csrf_of(page.text)})
        assert refused.status_code == 403 and "write on admin:registry" in refused.text
    async with login(gw, "admin") as http:
        page = await http.get("/console/registry")
        assert "Approve</button>" in page.text
        for sent in ({}, {"csrf": "0" * 64}):
            assert (await http.post("/console/registry/approve", data=approve | sent)).status_code == 403
        assert await call_lookup(gw) == "error: tool 'lookup' of server 'demo' is waiting for approval"
        unknown = await http.post(
            "/console/registry/approve", data=approve | {"tool": "nope", "csrf": csrf_of(page.text)}
        )
        assert unknown.status_code == 404
        other_kind = approve | {"kind": "prompt", "csrf": csrf_of(page.text)}  # no prompt named lookup
        assert (await http.post("/console/registry/approve", data=other_kind)).status_code == 404
        bogus = approve | {"kind": "<b>", "csrf": csrf_of(page.text)}
        assert (await http.post("/console/registry/approve", data=bogus)).status_code == 400
        done = await http.post("/console/registry/approve", data=approve | {"csrf": csrf_of(page.text)})
        assert done.status_code == 303 and done.headers["location"] == "/console/registry"
        after = await http.get("/console/registry")
    assert await call_lookup(gw) == "Oslo: ok"
    assert not re.search(r'<tr class="pending">', after.text)
    pins = gw.app.state.gateway.pins.pins("demo")
    assert [(p.name, p.state, p.approved_by) for p in pins] == [("lookup", "approved", "user:admin")]
