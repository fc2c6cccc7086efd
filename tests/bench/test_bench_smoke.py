"""A short run of `python -m bench compare`, so that the benchmark cannot rot unnoticed.

Not a performance test: it asserts that every path answers without errors and that every number the
report promises is there and positive, never how large it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONCURRENCIES = (1, 10)
CALLS = 200


def _compare(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "report.json"
    args = [sys.executable, "-m", "bench", "compare", "--calls", str(CALLS), "--warmup", "50"]
    # Later options win: a test may ask for fewer calls.
    args += ["--concurrency", ",".join(map(str, CONCURRENCIES)), "--json", str(out), *extra]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"bench compare failed:\n{done.stdout}\n{done.stderr}"
    return done, json.loads(out.read_text())


def _positive(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = row.get(key)
        assert isinstance(value, int | float) and value > 0, (
            f"{row['path']} c={row['concurrency']}: {key}={value!r}"
        )


def test_bench_compare_runs_every_path_at_every_concurrency_without_errors(tmp_path: Path) -> None:
    done, report = _compare(tmp_path, "--memory-run", "300")
    rows = report["rows"]
    assert [(r["path"], r["concurrency"]) for r in rows] == [
        (path, c) for c in CONCURRENCIES for path in ("direct", "gateway", "bridge")
    ]
    for row in rows:
        assert row["errors"] == 0, row["first_error"]
        assert row["calls"] == CALLS
        _positive(row, "calls_per_s", "seconds", "p50_ms", "p90_ms", "p99_ms")
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        if row["path"] == "direct":
            assert row["cpu_ms_per_call"] is None and row["ratio"] is None
        else:
            _positive(row, "cpu_ms_per_call", "ratio", "added_p50_ms")
            assert row["added_p99_ms"] is not None
    memory = report["memory"]
    assert memory["errors"] == 0
    _positive(memory, "rss_start_mb", "rss_end_mb", "calls_per_s", "cpu_ms_per_call")
    assert report["stages"], "the report names the pipeline stages that were on"
    assert "gateway" in done.stdout and "x direct" in done.stdout, done.stdout


def test_bench_compare_drives_legacy_sessions_through_the_pass_through_path(tmp_path: Path) -> None:
    _, report = _compare(tmp_path, "--era", "legacy", "--no-bridge")
    assert {r["path"] for r in report["rows"]} == {"direct", "gateway"}
    assert all(r["errors"] == 0 for r in report["rows"]), report["rows"]


@pytest.mark.parametrize("era", ["modern", "legacy"])
def test_bench_compare_measures_the_bare_forwarder_beside_the_gateway(tmp_path: Path, era: str) -> None:
    _, report = _compare(tmp_path, "--floor", "--no-bridge", "--era", era, "--calls", "100")
    assert [r["path"] for r in report["rows"]] == ["direct", "floor", "gateway"] * len(CONCURRENCIES)
    for row in report["rows"]:
        assert row["errors"] == 0, row["first_error"]
        if row["path"] != "direct":
            _positive(row, "calls_per_s", "cpu_ms_per_call", "ratio")


@pytest.mark.parametrize("kind", ["a2a", "llm"])
def test_bench_compare_measures_a2a_and_llm_calls_through_their_routes(tmp_path: Path, kind: str) -> None:
    _, report = _compare(tmp_path, "--kind", kind, "--calls", "60")
    assert report["kind"] == kind
    assert [r["path"] for r in report["rows"]] == ["direct", "gateway"] * len(CONCURRENCIES)
    for row in report["rows"]:
        assert row["errors"] == 0, row["first_error"]
        _positive(row, "calls_per_s", "p50_ms", "p99_ms")


def test_bench_compare_refuses_a_bad_concurrency_list(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "bench", "compare", "--concurrency", "1,x"]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--concurrency" in done.stderr


def test_bench_compare_serves_the_gateway_with_two_workers(tmp_path: Path) -> None:
    done, report = _compare(tmp_path, "--workers", "2", "--no-bridge", "--concurrency", "10")
    assert report["workers"] == 2
    assert "gateway workers: 2" in done.stdout
    assert [r["path"] for r in report["rows"]] == ["direct", "gateway"]
    assert all(r["errors"] == 0 for r in report["rows"]), report["rows"]
