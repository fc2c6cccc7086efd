"""The conformance suite's authorization-server scenarios against the gateway's built-in server, headless.

    python -m conformance.authorization_leg --node NODE --cli SUITE_CLI --issuer URL \
        --expected conformance/expected-failures.authorization.yml --out DIR

`conformance authorization` fetches the server's metadata, then prints an authorization URL and waits
for a browser to come back to its callback server on 127.0.0.1. This registers a public client for
that callback (RFC 7591, as a stock client does), runs the suite, plays the browser (the login form
with the conformance user of conformance/gateway.yaml), and compares the suite's checks with the
expected failures (each `scenario` or `scenario:check-id` with its reason). Exit status 0 when every
check passes or is listed, and no listed one passes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import yaml

from conformance.fixtures.launch import free_port

USER = ("conformance", "conformance")  # conformance/gateway.yaml's user, for this harness only
WAIT_S = 120.0


def register(issuer: str, callback: str) -> str:
    answer = httpx.post(
        f"{issuer}/oauth/register",
        json={
            "redirect_uris": [callback],
            "token_endpoint_auth_method": "none",
            "client_name": "MCP conformance",
        },
        timeout=10,
    )
    answer.raise_for_status()
    return str(answer.json()["client_id"])


def sign_in(url: str, issuer: str) -> None:
    """The browser: post the login form for the authorization URL, follow the redirect to the callback."""
    fields = dict(parse_qsl(urlsplit(url).query))
    answer = httpx.post(
        f"{issuer}/oauth/authorize", data=fields | {"username": USER[0], "password": USER[1]}, timeout=10
    )
    if answer.status_code != 302:
        raise SystemExit(
            f"authorization_leg: the login was refused: {answer.status_code} {answer.text[:300]}"
        )
    httpx.get(answer.headers["location"], timeout=10)


def outcomes(results: Path) -> dict[str, str]:
    """`scenario:check-id` -> status, from the suite's checks.json files."""
    found: dict[str, str] = {}
    for checks in sorted(results.glob("*/checks.json")):
        scenario = re.sub(r"^authorization-server-|-\d{4}-\d\d-\d\dT.*$", "", checks.parent.name)
        for check in json.loads(checks.read_text()):
            found[f"{scenario}:{check['id']}"] = check["status"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--node", required=True)
    parser.add_argument("--cli", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--expected", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    issuer = args.issuer.rstrip("/")
    expected: dict[str, str] = {
        entry["id"]: entry["reason"]
        for entry in (yaml.safe_load(args.expected.read_text()) or {}).get("authorization") or []
    }
    port = free_port()
    client_id = register(issuer, f"http://127.0.0.1:{port}/callback")
    results = args.out / "results"
    command = [
        args.node, args.cli, "authorization", "--url", issuer, "--client-id", client_id,
        "--resource", f"{issuer}/mcp", "--port", str(port), "-o", str(results),
    ]  # fmt: skip
    log = args.out / "authorization.out"
    with log.open("w") as sink:
        suite = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=args.out)
        try:
            deadline = time.monotonic() + WAIT_S
            url = None
            while url is None and suite.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
                url = next(
                    (
                        line
                        for line in log.read_text().splitlines()
                        if line.startswith(f"{issuer}/oauth/authorize?")
                    ),
                    None,
                )
            # Its callback server starts after it prints the URL: wait until it accepts.
            while url is not None and time.monotonic() < deadline:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            if url is not None:
                sign_in(url, issuer)
            suite.wait(timeout=WAIT_S)
        finally:
            if suite.poll() is None:
                suite.kill()
                suite.wait()
    print(log.read_text())
    found = outcomes(results)
    failed = {k for k, status in found.items() if status not in ("SUCCESS", "INFO")}
    listed = {k for k in found if k in expected or k.split(":")[0] in expected}
    unexpected = sorted(failed - listed)
    now_passing = sorted(k for k in expected if not any(f == k or f.startswith(f"{k}:") for f in failed))
    for key in unexpected:
        print(f"authorization_leg: unexpected failure {key}: {found[key]}", file=sys.stderr)
    for key in now_passing:
        print(
            f"authorization_leg: {key} is listed as failing but passes: remove it from {args.expected}",
            file=sys.stderr,
        )
    if not found:
        print("authorization_leg: the suite reported no checks", file=sys.stderr)
    print(f"Total: {len(found) - len(failed)} passed, {len(failed)} failed ({len(failed & listed)} expected)")
    return 1 if unexpected or now_passing or not found else 0


if __name__ == "__main__":
    raise SystemExit(main())
