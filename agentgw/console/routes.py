"""The console's routes, session and page rendering (see the package docstring)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal, cast, get_args
from urllib.parse import urlencode

import anyio.to_thread
import httpx
import jinja2
import orjson
import yaml
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import FormData
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from agentgw.call import Principal
from agentgw.errors import GatewayError
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import DEFAULT_DENY, CasbinAuthorizer, PolicyError
from agentgw.filters.budget import BudgetStore, effective_budgets
from agentgw.filters.policy_review import lint, parse_rules, replay
from agentgw.records.audit import printable
from agentgw.registry.models import NAME_REGEX
from agentgw.registry.pins import PinKind, Pins
from agentgw.registry.store import RegistryStore
from agentgw.storage.audit import AuditQuery, VerifyReport, iter_records, otel_record, parse_time, query
from agentgw.storage.budget.rules import BudgetRuleBook

__all__ = ["CONSOLE_CLIENT_ID", "Console", "ConsoleSettings", "console_router", "console_static"]

CONSOLE_CLIENT_ID = "agentgw-console"
SESSION_COOKIE = "agentgw_console"
LOGIN_COOKIE = "agentgw_console_login"
LOGIN_TTL_S = 600
PAGE = 200
EXPORT_PAGE = 1000
# Longer filter values match nothing a record holds (its fields are capped shorter): refused instead.
MAX_FILTER = 512
MAX_CASES_BYTES = 64 * 1024
MAX_CASES = 500
# A pasted candidate policy: as large as a policy one reads on a page, no larger.
MAX_CANDIDATE_BYTES = 64 * 1024
# A replay reads at most this many recorded decisions (the page says when it stopped there).
MAX_REPLAYED = 100_000
MAX_SHOWN_CHANGES = 200
MAX_TOOL_NAME = 256
HERE = Path(__file__).parent

# No script at all; styles, images and form targets from the gateway only; never framed.
CSP = (
    "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

Health = Callable[[], Mapping[str, Mapping[str, Any]]]


class ConsoleSettings(BaseModel):
    """The `console:` section of the config file."""

    model_config = ConfigDict(extra="forbid")

    # Served at /console when the built-in authorization server is on (it is how one logs in).
    enabled: bool = True


@dataclass
class Console:
    """What the console reads of the gateway; built once by the app."""

    base_url: str
    authenticate: Authenticate
    authorizer: CasbinAuthorizer
    # The built-in authorization server's routes, for the code exchange in-process.
    oauth: ASGIApp
    audit_engine: Engine
    audit_flush: Callable[[], Awaitable[None]]
    audit_verify: Callable[[], VerifyReport]
    registry: RegistryStore
    budget_rules: BudgetRuleBook
    budget_store: BudgetStore
    health: Health
    # Tool pinning; None: the gateway keeps no pins (the page then shows none waiting).
    pins: Pins | None = None
    models: Sequence[str] = ()
    agents: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    csrf: str


# The pages, each with the grant its admin API needs (docs/security.md).
PAGES: tuple[tuple[str, str, str, str], ...] = (
    ("audit", "/console/audit", "Audit explorer", "admin:audit"),
    ("policies", "/console/policies", "Policy workbench", "admin:policies"),
    ("registry", "/console/registry", "Registry", "admin:registry"),
    ("budgets", "/console/budgets", "Budgets", "admin:budgets"),
)


def _shown(value: object) -> str:
    """A value as shown on a page: printable (autoescape then makes it inert HTML)."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return _json(value)
    if isinstance(value, list | tuple):
        return ", ".join(printable(str(v)) for v in value)
    return printable(str(value))


def _json(value: object) -> str:
    return printable(orjson.dumps(value).decode(), in_json=True)


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["shown"] = _shown
    environment.filters["json"] = _json
    return Jinja2Templates(env=environment)


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _csrf(token: str) -> str:
    # Derived from the session token: nothing to store, and unknown to anyone who lacks the cookie.
    return hmac.new(token.encode(), b"agentgw-console-csrf", hashlib.sha256).hexdigest()


def console_router(console: Console) -> APIRouter:
    """Routes under /console (and its static files)."""
    router = APIRouter(prefix="/console", include_in_schema=False)
    templates = _templates()
    secure = console.base_url.startswith("https://")
    callback = f"{console.base_url}/console/callback"
    audience = f"{console.base_url}/admin"

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("session", None)
        context.setdefault("pages", ())
        return templates.TemplateResponse(request, name, context, status_code=status, headers=HEADERS)

    def redirect(url: str) -> Response:
        return RedirectResponse(url, status_code=303, headers=HEADERS)

    def allowed(principal: Principal, area: str, act: str = "read") -> bool:
        return console.authorizer.decide(principal, area, act).allowed

    async def session(request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            principal = await console.authenticate.principal(f"Bearer {token}", endpoint="/admin")
        except GatewayError:
            return None
        return Session(principal, _csrf(token))

    async def gate(request: Request, area: str | None, act: str = "read") -> Session | Response:
        """The session, or the response that takes its place: to the login, or a refusal."""
        found = await session(request)
        if found is None:
            return redirect("/console/login")
        if area is not None and not allowed(found.principal, area, act):
            return render(
                request,
                "denied.html",
                403,
                session=found,
                pages=visible(found),
                grant=f"{act} on {area}",
            )
        return found

    def visible(found: Session) -> list[tuple[str, str, str]]:
        return [(key, url, title) for key, url, title, area in PAGES if allowed(found.principal, area)]

    def checked(found: Session, form: FormData) -> bool:
        sent = form.get("csrf")
        return isinstance(sent, str) and hmac.compare_digest(sent, found.csrf)

    # --- login ---------------------------------------------------------------------------------

    @router.get("/login")
    async def login() -> Response:
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        query_string = urlencode(
            {
                "response_type": "code",
                "client_id": CONSOLE_CLIENT_ID,
                "redirect_uri": callback,
                "code_challenge": _challenge(verifier),
                "code_challenge_method": "S256",
                "state": state,
                "resource": audience,
            }
        )
        response = redirect(f"/oauth/authorize?{query_string}")
        # Lax: the authorization server may send the browser back from another site one day.
        response.set_cookie(
            LOGIN_COOKIE,
            f"{state}.{verifier}",
            max_age=LOGIN_TTL_S,
            path="/console",
            secure=secure,
            httponly=True,
            samesite="lax",
        )
        return response

    @router.get("/callback")
    async def callback_(request: Request, code: str = "", state: str = "") -> Response:
        expected_state, _, verifier = request.cookies.get(LOGIN_COOKIE, "").partition(".")
        if not code or not expected_state or not hmac.compare_digest(state, expected_state):
            return render(request, "message.html", 400, title="Sign-in failed", text="Start again.")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": callback,
            "client_id": CONSOLE_CLIENT_ID,
            "code_verifier": verifier,
        }
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(console.oauth), base_url=console.base_url
        ) as http:
            answer = await http.post("/oauth/token", data=form)
        body = answer.json() if answer.status_code == 200 else {}
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            return render(request, "message.html", 400, title="Sign-in failed", text="Start again.")
        response = redirect("/console")
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(body.get("expires_in") or 3600),
            path="/console",
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/console", secure=secure, httponly=True, samesite="lax")
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        found = await session(request)
        if found is not None and not checked(found, await request.form()):
            return render(request, "message.html", 403, title="Refused", text="The form was not ours.")
        response = render(request, "message.html", title="Signed out", text="You are signed out.")
        response.delete_cookie(
            SESSION_COOKIE, path="/console", secure=secure, httponly=True, samesite="strict"
        )
        return response

    # --- index ---------------------------------------------------------------------------------

    @router.get("")
    async def index(request: Request) -> Response:
        found = await gate(request, None)
        if isinstance(found, Response):
            return found
        return render(request, "index.html", session=found, pages=visible(found))

    # --- audit ---------------------------------------------------------------------------------

    def audit_filters(request: Request) -> tuple[AuditQuery, dict[str, str], str | None]:
        params = {
            k: request.query_params.get(k, "")
            for k in ("since", "until", "subject", "protocol", "resource", "decision", "run_id", "event")
        }
        problem = None
        for name, value in params.items():
            if len(value) > MAX_FILTER:
                problem = f"{name} is longer than {MAX_FILTER} characters"
                params[name] = ""
        times: dict[str, str | None] = {}
        for name in ("since", "until"):
            try:
                times[name] = parse_time(params[name]) if params[name] else None
            except ValueError as exc:
                problem = f"{name}: {exc}"
                times[name] = None
        filters = AuditQuery(
            since=times["since"],
            until=times["until"],
            subject=params["subject"] or None,
            protocol=params["protocol"] or None,
            resource=params["resource"] or None,
            decision=params["decision"] or None,
            run_id=params["run_id"] or None,
            event=params["event"] or None,
        )
        return filters, params, problem

    async def read(work: Callable[[], Any]) -> Any:
        await console.audit_flush()
        return await anyio.to_thread.run_sync(work)

    @router.get("/audit")
    async def audit(request: Request) -> Response:
        found = await gate(request, "admin:audit")
        if isinstance(found, Response):
            return found
        filters, params, problem = audit_filters(request)
        try:
            rows = await read(partial(query, console.audit_engine, filters, limit=PAGE, newest_first=True))
        except SQLAlchemyError:
            rows, problem = [], "the audit log is unavailable"
        return render(
            request,
            "audit.html",
            session=found,
            pages=visible(found),
            rows=rows,
            params=params,
            problem=problem,
            export=urlencode({k: v for k, v in params.items() if v}),
            page=PAGE,
        )

    @router.get("/audit/run")
    async def run(request: Request, run_id: str = "") -> Response:
        found = await gate(request, "admin:audit")
        if isinstance(found, Response):
            return found
        if not run_id or len(run_id) > MAX_FILTER:
            return redirect("/console/audit")
        rows = await read(partial(query, console.audit_engine, AuditQuery(run_id=run_id), limit=EXPORT_PAGE))
        outcomes = [r for r in rows if r.get("event") != "decision"]
        totals = {
            "calls": len({r["request_id"] for r in rows}),
            "denied": sum(1 for r in rows if r.get("decision") == "denied"),
            "tokens": sum(int(r.get("tokens") or 0) for r in outcomes),
            "cost": round(sum(float(r.get("cost") or 0.0) for r in outcomes), 6),
            "protocols": sorted({str(r.get("protocol")) for r in rows}),
        }
        return render(
            request, "run.html", session=found, pages=visible(found), run_id=run_id, rows=rows, totals=totals
        )

    @router.get("/audit/verify")
    async def verify(request: Request) -> Response:
        found = await gate(request, "admin:audit")
        if isinstance(found, Response):
            return found
        try:
            report: VerifyReport | None = await read(console.audit_verify)
        except SQLAlchemyError:
            report = None
        return render(
            request,
            "verify.html",
            session=found,
            pages=visible(found),
            report=report,
            problem=asdict(report.problem) if report is not None and report.problem else None,
        )

    @router.get("/audit/export")
    async def export(request: Request, format: Literal["jsonl", "otel"] = "jsonl") -> Response:
        found = await gate(request, "admin:audit")
        if isinstance(found, Response):
            return found
        filters, _, problem = audit_filters(request)
        if problem is not None:
            return render(request, "message.html", 400, title="Export refused", text=problem)
        await console.audit_flush()

        async def lines() -> AsyncIterator[bytes]:
            after = 0
            while True:
                rows = await anyio.to_thread.run_sync(
                    partial(query, console.audit_engine, filters, limit=EXPORT_PAGE, after_id=after)
                )
                for row in rows:
                    value = otel_record(row) if format == "otel" else row
                    yield printable(orjson.dumps(value).decode(), in_json=True).encode() + b"\n"
                if len(rows) < EXPORT_PAGE:
                    return
                after = rows[-1]["id"]

        disposition = f'attachment; filename="agentgw-audit.{format}.jsonl"'
        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={**HEADERS, "content-disposition": disposition},
        )

    # --- policies ------------------------------------------------------------------------------

    @router.get("/policies")
    async def policies(request: Request) -> Response:
        found = await gate(request, "admin:policies")
        if isinstance(found, Response):
            return found
        form = {
            k: request.query_params.get(k, "")[:MAX_FILTER] for k in ("subject", "roles", "object", "action")
        }
        result = None
        if form["subject"] and form["object"] and form["action"]:
            roles = [r.strip() for r in form["roles"].split(",") if r.strip()]
            decision = console.authorizer.explain(form["subject"], roles, (), form["object"], form["action"])
            result = {"allowed": decision.allowed, "rule": decision.rule}
        return workbench(request, found, form=form, result=result)

    def workbench(request: Request, found: Session, status: int = 200, **shown: Any) -> Response:
        context: dict[str, Any] = {
            "form": {"subject": "", "roles": "", "object": "", "action": ""},
            "result": None,
            "cases": "",
            "outcomes": None,
            "problem": None,
            "candidate": "",
            "since": "7d",
            "replayed": None,
            "replay_problem": None,
        }
        return render(
            request,
            "policies.html",
            status,
            session=found,
            pages=visible(found),
            rules=console.authorizer.rules,
            can_replay=allowed(found.principal, "admin:audit"),
            **(context | shown),
        )

    @router.post("/policies/test")
    async def policy_tests(request: Request) -> Response:
        found = await gate(request, "admin:policies")
        if isinstance(found, Response):
            return found
        form = await request.form()
        if not checked(found, form):
            return render(request, "message.html", 403, title="Refused", text="The form was not ours.")
        text = str(form.get("cases") or "")
        outcomes, problem = None, None
        if len(text.encode()) > MAX_CASES_BYTES:
            problem = f"the cases are longer than {MAX_CASES_BYTES} bytes"
        else:
            try:
                outcomes = _run_cases(console.authorizer, text)
            except ValueError as exc:
                problem = str(exc)
        return workbench(
            request, found, 200 if problem is None else 400, cases=text, outcomes=outcomes, problem=problem
        )

    @router.post("/policies/replay")
    async def policy_replay(request: Request) -> Response:
        # It reads the recorded log as much as the policy: both grants, like the CLI's two inputs.
        found = await gate(request, "admin:policies")
        if isinstance(found, Response):
            return found
        if not allowed(found.principal, "admin:audit"):
            return render(
                request, "denied.html", 403, session=found, pages=visible(found), grant="read on admin:audit"
            )
        form = await request.form()
        if not checked(found, form):
            return render(request, "message.html", 403, title="Refused", text="The form was not ours.")
        text, since = str(form.get("candidate") or ""), str(form.get("since") or "7d")[:MAX_FILTER]
        replayed, problem = None, None
        try:
            if len(text.encode()) > MAX_CANDIDATE_BYTES:
                raise PolicyError(f"the candidate is longer than {MAX_CANDIDATE_BYTES} bytes")
            try:
                start = parse_time(since)
            except ValueError as exc:
                raise PolicyError(f"since: {exc}") from exc
            await console.audit_flush()
            replayed = await anyio.to_thread.run_sync(
                partial(_replay, console.audit_engine, console.authorizer.model, text, start)
            )
        except PolicyError as exc:
            problem = exc.message
        except SQLAlchemyError:
            problem = "the audit log is unavailable"
        return workbench(
            request,
            found,
            200 if problem is None else 400,
            # An oversized candidate is not sent back: the page stays as small as the cap.
            candidate=text if len(text.encode()) <= MAX_CANDIDATE_BYTES else "",
            since=since,
            replayed=replayed,
            replay_problem=problem,
        )

    # --- registry and budgets ------------------------------------------------------------------

    @router.get("/registry")
    async def registry(request: Request) -> Response:
        found = await gate(request, "admin:registry")
        if isinstance(found, Response):
            return found
        failing = console.registry.failing_servers()
        servers = [
            {
                "name": spec.name,
                "transport": spec.transport,
                "url": str(spec.url or spec.command or ""),
                "owner": console.registry.owner(spec.name) or "",
                "problem": failing.get(spec.name, ""),
            }
            for spec in console.registry.all_servers()
        ]
        virtual = [v.name for v in console.registry.virtual_servers()]
        health = sorted((name, dict(state)) for name, state in console.health().items())
        waiting = []
        if console.pins is not None:
            await anyio.to_thread.run_sync(console.pins.refresh)
            waiting = [
                {
                    "server": p.server,
                    "kind": p.kind,
                    "name": p.name,
                    "state": p.state,
                    "changed": p.changes(),
                    "seen": p.seen,
                }
                for p in console.pins.waiting()
            ]
        return render(
            request,
            "registry.html",
            session=found,
            pages=visible(found),
            servers=servers,
            virtual=virtual,
            models=list(console.models),
            agents=list(console.agents),
            health=health,
            waiting=waiting,
            can_approve=allowed(found.principal, "admin:registry", "write"),
        )

    @router.post("/registry/approve")
    async def approve(request: Request) -> Response:
        found = await gate(request, "admin:registry", "write")
        if isinstance(found, Response):
            return found
        form = await request.form()
        if not checked(found, form):
            return render(request, "message.html", 403, title="Refused", text="The form was not ours.")
        server, tool = str(form.get("server") or ""), str(form.get("tool") or "")
        kind = form.get("kind")
        if (
            console.pins is None
            or kind not in get_args(PinKind)
            or not re.fullmatch(NAME_REGEX, server)
            or not 0 < len(tool) <= MAX_TOOL_NAME
        ):
            return render(request, "message.html", 400, title="Refused", text="No such server or tool.")
        try:
            # The same approval as `agentgw registry approve` and the admin API: the definition last seen.
            await anyio.to_thread.run_sync(
                partial(
                    console.pins.approve, server, [tool], by=found.principal.subject, kind=cast(PinKind, kind)
                )
            )
        except KeyError as exc:
            return render(request, "message.html", 404, title="Not approved", text=str(exc.args[0]))
        return redirect("/console/registry")

    @router.get("/budgets")
    async def budgets(request: Request, subject: str = "", roles: str = "", run: str = "") -> Response:
        found = await gate(request, "admin:budgets")
        if isinstance(found, Response):
            return found
        await anyio.to_thread.run_sync(console.budget_rules.refresh)
        rules = [{"rule": r.model_dump(mode="json"), "source": s} for r, s in console.budget_rules.rules()]
        use = None
        subject, roles, run = subject[:MAX_FILTER], roles[:MAX_FILTER], run[:MAX_FILTER]
        if subject:
            principal = Principal(
                subject=subject, roles=tuple(r.strip() for r in roles.split(",") if r.strip())
            )
            use = await effective_budgets(
                await console.budget_rules.current(),
                console.budget_store,
                principal,
                run or None,
                time.time(),
            )
        return render(
            request,
            "budgets.html",
            session=found,
            pages=visible(found),
            rules=rules,
            use=use,
            form={"subject": subject, "roles": roles, "run": run},
        )

    return router


def console_static() -> ASGIApp:
    """The console's vendored static files, for /console/static."""
    return StaticFiles(directory=HERE / "static")


def _run_cases(authorizer: CasbinAuthorizer, text: str) -> list[dict[str, Any]]:
    """Each case of a YAML list (`subject`, `object`, `action`, `expect`, optional `roles`, `actors`,
    `rule`, `name`: the cases of `agentgw policy test`) run against the policy in force.

    Raises:
        ValueError: not YAML, not a list of cases, or a case that is malformed.
    """
    try:
        cases = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError("the cases are not YAML") from exc
    if isinstance(cases, dict):
        cases = cases.get("cases")
    if not isinstance(cases, list) or not cases:
        raise ValueError("want a YAML list of cases (or a mapping with `cases`)")
    if len(cases) > MAX_CASES:
        raise ValueError(f"at most {MAX_CASES} cases at once")
    out = []
    for number, raw in enumerate(cases, 1):
        if not isinstance(raw, dict) or not {"subject", "object", "action", "expect"} <= set(raw):
            raise ValueError(f"case {number}: want subject, object, action and expect")
        if raw["expect"] not in ("allow", "deny"):
            raise ValueError(f"case {number}: expect must be allow or deny")
        roles = [r if str(r).startswith("role:") else f"role:{r}" for r in raw.get("roles") or ()]
        actors = [str(a) for a in raw.get("actors") or ()]
        decision = authorizer.explain(
            str(raw["subject"]), roles, actors, str(raw["object"]), str(raw["action"])
        )
        got = "allow" if decision.allowed else "deny"
        problem = None
        if got != raw["expect"]:
            problem = f"expected {raw['expect']}, got {got}"
        elif raw.get("rule") is not None and decision.rule != raw["rule"]:
            problem = f"decided by {decision.rule!r}, not {raw['rule']!r}"
        out.append(
            {
                "name": raw.get("name") or f"{raw['subject']} {raw['action']} {raw['object']}",
                "got": got,
                "rule": decision.rule,
                "problem": problem,
            }
        )
    return out


def _replay(engine: Engine, model: Path, text: str, since: str) -> dict[str, Any]:
    """A candidate policy (CSV text, decided with `model`) replayed against the recorded decisions
    since `since`: what `agentgw policy replay` prints, as data for the page.

    Raises:
        PolicyError: the candidate is empty or a line of it is malformed.
    """
    rules = parse_rules(text)
    if not rules:
        raise PolicyError("the candidate has no rules")
    candidate = CasbinAuthorizer(model, None, rules, allow_empty=True)
    read = 0

    def records() -> Iterator[dict[str, Any]]:
        nonlocal read
        for record in islice(iter_records(engine, AuditQuery(since=since, event="decision")), MAX_REPLAYED):
            read += 1
            yield record

    replayed, changes = replay(records(), candidate)
    counts = {
        key: sorted(Counter((str(c.record[key]), c.was, c.now) for c in changes).items())
        for key in ("subject", "resource")
    }
    return {
        "since": since,
        "replayed": replayed,
        "stopped": read >= MAX_REPLAYED,
        "findings": lint(rules),
        "narrowing": sum(not c.widening for c in changes),
        "widening": sum(c.widening for c in changes),
        "changes": [
            {
                "time": c.record["time"],
                "request_id": c.record["request_id"],
                "subject": c.record["subject"],
                "action": c.record["action"],
                "resource": c.record["resource"],
                "was": c.was,
                "now": c.now,
                "was_rule": c.record["rule"] or DEFAULT_DENY,
                "now_rule": c.now_rule,
            }
            for c in changes[:MAX_SHOWN_CHANGES]
        ],
        "total": len(changes),
        "by_subject": counts["subject"],
        "by_object": counts["resource"],
    }
