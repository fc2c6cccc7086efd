"""The console in a real browser: Playwright drives Debian's chromium (`/usr/bin/chromium`, installed
by scripts/test; Playwright's own browser download is never used) against a gateway process that
real MCP calls went through.

The tests marked only `browser` are the bounded set CI runs; `browser_full` ones run with
`--browser-all`. Without chromium they are skipped locally and fail in CI.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.console.support import PASSWORD, console_config
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.mcp import MODERN

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("AGENTGW_CHROMIUM", "/usr/bin/chromium"))
RUN = f"run-{uuid.uuid4().hex[:8]}"
# ASCII only (it travels in an Mcp-Name header too): markup that would change the page's title if
# any of it ran.
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no chromium at {CHROMIUM}: scripts/test installs Debian's package")
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


async def _drive(url: str) -> None:
    """In one run: an allowed call, a call the policy denies, and a call named with markup."""
    async with (
        httpx.AsyncClient(headers={"agent-run-id": RUN}) as http,
        Client(streamable_http_client(f"{url}/mcp/modern", http_client=http), mode=MODERN) as client,
    ):
        assert not (await client.call_tool("echo", {"text": "hello"})).is_error
        with pytest.raises(MCPError):
            await client.call_tool("add", {"a": 1, "b": 2})
        # The upstream knows no such tool; the call's records are what matters.
        assert (await client.call_tool(HOSTILE, {"text": HOSTILE})).is_error


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = console_config(servers=[{"name": "modern", "url": f"{modern_upstream}/mcp"}])
    config["policy"]["rules"] += [
        "p, anonymous, mcp:modern/*, *, allow",
        "p, anonymous, mcp:modern/add, call, deny",
    ]
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, _drive, gw.url).result()
        yield gw


def sign_in(browser: Browser, gw: RunningGateway, user: str) -> Page:
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{gw.url}/console")
    # Sent on to the built-in authorization server's sign-in form.
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=f"Signed in as user:{user}")).to_be_visible()
    return page


def test_an_auditor_signs_in_filters_to_a_run_and_sees_the_denied_call_and_its_rule(
    browser: Browser, gateway: RunningGateway
) -> None:
    page = sign_in(browser, gateway, "auditor")
    page.get_by_role("link", name="Audit explorer").first.click()
    page.fill("input[name=run_id]", RUN)
    page.select_option("select[name=decision]", "denied")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#records tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".resource")).to_have_text("mcp:modern/add")
    expect(rows.first.locator(".rule")).to_have_text(re.compile(r"p, anonymous, mcp:modern/add, call, deny"))
    # The run's timeline holds all its calls, the allowed one too.
    rows.first.get_by_role("link", name=RUN).click()
    timeline = page.locator("#timeline li")
    expect(timeline.filter(has_text="mcp:modern/echo").first).to_be_visible()
    expect(page.locator(".totals")).to_contain_text("denied")


def test_a_hostile_record_is_rendered_as_inert_text(browser: Browser, gateway: RunningGateway) -> None:
    page = sign_in(browser, gateway, "auditor")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{gateway.url}/console/audit?run_id={RUN}")
    # The arguments are kept as sent (the resource name is percent-encoded by the gateway itself).
    cell = page.locator("#records .arguments", has_text="<script>").first
    expect(cell).to_contain_text("<script>document.title='pwned'</script><img src=x onerror=")
    page.goto(f"{gateway.url}/console/audit/run?run_id={RUN}")
    expect(page.locator("#timeline .arguments", has_text="onerror").first).to_be_visible()
    assert page.title() != "pwned" and dialogs == []
    assert page.locator("#records img, #timeline img, main script").count() == 0


def test_a_page_is_refused_without_its_grant(browser: Browser, gateway: RunningGateway) -> None:
    page = sign_in(browser, gateway, "auditor")
    expect(page.get_by_role("link", name="Policy workbench")).to_have_count(0)
    for path in ("/console/policies", "/console/registry"):
        answer = page.goto(f"{gateway.url}{path}")
        assert answer is not None and answer.status == 403
        expect(page.locator("#denied")).to_contain_text("needs read on admin:")


def test_a_candidate_policy_replayed_shows_the_calls_it_would_change(
    browser: Browser, gateway: RunningGateway
) -> None:
    page = sign_in(browser, gateway, "admin")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.get_by_role("link", name="Policy workbench").first.click()
    page.fill(
        "textarea[name=candidate]",
        "p, anonymous, mcp:modern/echo, call, allow\np, anonymous, mcp:modern/add, call, allow",
    )
    page.fill("input[name=since]", "1h")
    page.get_by_role("button", name="Replay", exact=True).click()
    expect(page.locator("#replay")).to_contain_text("denied → allowed: 1")
    widening = page.locator("#changes tr.widening")
    expect(widening).to_have_count(1)
    expect(widening.first).to_contain_text("mcp:modern/add")
    # The call named with markup (percent-encoded in its resource) was allowed by `mcp:modern/*`; the
    # candidate no longer allows it.
    narrowing = page.locator("#changes tr.narrowing")
    expect(narrowing).to_have_count(1)
    expect(narrowing.first).to_contain_text("mcp:modern/%3Cscript%3E")
    expect(page.locator("#by-subject")).to_contain_text("anonymous")
    assert page.title() != "pwned" and dialogs == []
    assert page.locator("main script, main img").count() == 0


@pytest.mark.browser_full
def test_the_workbench_explains_a_decision_and_runs_cases(browser: Browser, gateway: RunningGateway) -> None:
    page = sign_in(browser, gateway, "security")
    page.get_by_role("link", name="Policy workbench").first.click()
    page.fill("input[name=subject]", "anonymous")
    page.fill("input[name=object]", "mcp:modern/add")
    page.fill("input[name=action]", "call")
    page.get_by_role("button", name="Check").click()
    expect(page.locator("#check")).to_contain_text("Denied")
    expect(page.locator("#check")).to_contain_text("p, anonymous, mcp:modern/add, call, deny")
    page.fill(
        "textarea[name=cases]", "- {subject: anonymous, object: mcp:modern/echo, action: call, expect: allow}"
    )
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#outcomes tr.pass")).to_have_count(1)


@pytest.mark.browser_full
def test_the_chains_verify_and_the_export_downloads(browser: Browser, gateway: RunningGateway) -> None:
    page = sign_in(browser, gateway, "auditor")
    page.goto(f"{gateway.url}/console/audit/verify")
    expect(page.locator("#verify")).to_contain_text("Intact")
    page.goto(f"{gateway.url}/console/audit?run_id={RUN}")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export JSON Lines").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert len(lines) >= 3 and all(RUN in line for line in lines)


@pytest.mark.browser_full
def test_signing_out_ends_the_session(browser: Browser, gateway: RunningGateway) -> None:
    page = sign_in(browser, gateway, "operator")
    page.get_by_role("link", name="Registry").first.click()
    expect(page.locator("#servers")).to_contain_text("modern")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Signed out")).to_be_visible()
    page.goto(f"{gateway.url}/console/registry")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
