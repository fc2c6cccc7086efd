"""The gateway serves what its OpenAPI document says: schemathesis runs every check it has against
every operation of `/openapi.json` on a real gateway, authenticated as an administrator.

The run is bounded: `AGENTGW_SCHEMATHESIS_EXAMPLES` cases per operation and phase (25 unless set;
a few thousand for a thorough run), `AGENTGW_SCHEMATHESIS_SEED` to replay a run (the seed of each
run is in its output). The gateway runs in its own directory on SQLite: the run may change anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from tests.support.gateway import RunningGateway, run_gateway

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("AGENTGW_SCHEMATHESIS_EXAMPLES", "25"))
# CI runs one fixed seed, so that a red run is the code's doing and can be replayed; set the variable
# to another seed (or `random`) to explore. A random run has once found a 500 on GET
# /admin/audit/records after a stateful sequence that has not been reproduced yet (see the CHANGELOG).
SEED = os.environ.get("AGENTGW_SCHEMATHESIS_SEED", "155315404966862673856149708782169448062")
# Every admin area but `admin:exec`: a stdio server added by the run would run its command here. Adding
# one is then a 403, which the document declares.
AREAS = ("registry", "budgets", "audit", "policies", "keys")
POLICY = [f"p, role:admin, admin:{area}, *, allow" for area in AREAS]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    # A server and a budget the config file owns: the API may read them, not change them (409).
    config = {
        "servers": [{"name": "from-config", "url": "http://127.0.0.1:9/mcp"}],
        "budgets": {"rules": [{"name": "from-config", "per": "subject", "calls": 10, "window": "hour"}]},
        "policy": {"rules": POLICY, "database": True},
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def admin_token(gw: RunningGateway) -> str:
    token, _ = mint_token(
        SigningKeys(gw.signing_keys),
        gw.url,
        subject="schemathesis",
        audience=f"{gw.url}/admin",
        roles=["admin"],
    )
    return token


def outcomes(junit: Path) -> tuple[int, list[str]]:
    """How many operations a JUnit report has, and those that failed (the output shows how)."""
    cases = list(ElementTree.parse(junit).iter("testcase"))  # noqa: S314  # our own subprocess's report
    failed = [
        c.get("name", "?") for c in cases if c.find("failure") is not None or c.find("error") is not None
    ]
    return len(cases), failed


def test_every_operation_conforms_to_the_openapi_document(gateway: RunningGateway, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    args = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        f"--config-file={REPO / 'tests/admin/schemathesis.toml'}",
        "run",
        f"{gateway.url}/openapi.json",
        "--checks=all",
        f"--max-examples={EXAMPLES}",
        f"--header=Authorization: Bearer {admin_token(gateway)}",
        "--workers=1",
        "--generation-database=none",
        "--request-timeout=10",
        "--no-color",
        "--report=junit",
        f"--report-junit-path={junit}",
        *([f"--seed={SEED}"] if SEED != "random" else []),
    ]
    # The hooks module is imported by name; the run's own files (its cache) stay in tmp_path.
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = subprocess.run(
        args, capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path, env=env
    )
    output = run.stdout + run.stderr
    assert junit.exists(), output
    operations, failed = outcomes(junit)
    assert operations >= 25, output  # the admin API, the OAuth documents: nothing left out of the run
    assert run.returncode == 0 and not failed, output
