"""Screenshots of the console's main pages for docs/console/, from a gateway that real calls went
through: `.venv/bin/python -m tests.console.screenshots [docs/console]` (needs /usr/bin/chromium)."""

from __future__ import annotations

import contextlib
import sys
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio
import httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from playwright.sync_api import sync_playwright

from conformance.fixtures.launch import start_upstream_sync
from tests.console.support import PASSWORD, console_config
from tests.support.gateway import run_gateway
from tests.support.mcp import MODERN

RUN = f"run-{uuid.uuid4().hex[:6]}"


async def _traffic(url: str) -> None:
    async with (
        httpx.AsyncClient(headers={"agent-run-id": RUN}) as http,
        Client(streamable_http_client(f"{url}/mcp/modern", http_client=http), mode=MODERN) as client,
    ):
        for text in ("hello", "again"):
            await client.call_tool("echo", {"text": text})
        # Denied by policy: that record is part of the picture.
        with contextlib.suppress(MCPError):
            await client.call_tool("add", {"a": 1, "b": 2})


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with start_upstream_sync("modern") as upstream, TemporaryDirectory() as tmp:
        config = console_config(servers=[{"name": "modern", "url": f"{upstream}/mcp"}])
        config["policy"]["rules"] += [
            "p, anonymous, mcp:modern/*, *, allow",
            "p, anonymous, mcp:modern/add, call, deny",
        ]
        with run_gateway(Path(tmp), config) as gw:
            anyio.run(_traffic, gw.url)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1400, "height": 800})
                page.goto(f"{gw.url}/console")
                page.fill("input[name=username]", "admin")
                page.fill("input[name=password]", PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(f"{gw.url}/console")
                shots = {
                    "audit.png": f"/console/audit?run_id={RUN}",
                    "run.png": f"/console/audit/run?run_id={RUN}",
                    "policies.png": "/console/policies?subject=anonymous&object=mcp:modern/add&action=call",
                    "registry.png": "/console/registry",
                }
                for name, path in shots.items():
                    page.goto(f"{gw.url}{path}")
                    page.screenshot(path=str(out / name), full_page=True)
                    print(out / name)
                # A candidate that allows the denied call and narrows the rest: the replay's answer.
                page.goto(f"{gw.url}/console/policies")
                page.fill("textarea[name=candidate]", "p, anonymous, mcp:modern/add, call, allow")
                page.get_by_role("button", name="Replay", exact=True).click()
                page.locator("#replay").wait_for()
                page.screenshot(path=str(out / "replay.png"), full_page=True)
                print(out / "replay.png")
                browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console"))
