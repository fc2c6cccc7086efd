"""`python -m bench stages`: a short run, so that the per-stage measurement cannot rot unnoticed.

Not a performance test: it asserts that every configuration of both paths answers its calls (the
bench raises on any call the gateway did not answer with the tool's result) and gets its row.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.stages import BRIDGE_CONFIGS, CONFIGS

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_stages_prints_a_row_per_configuration_of_both_paths() -> None:
    args = [sys.executable, "-m", "bench", "stages", "--calls", "20", "--rounds", "2"]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"bench stages failed:\n{done.stdout}\n{done.stderr}"
    rows = re.findall(r"^(gateway|bridge) +(\S+) +[\d.]+ us/call", done.stdout, re.MULTILINE)
    expected = [("gateway", c) for c in CONFIGS] + [("bridge", c) for c in BRIDGE_CONFIGS]
    assert rows == expected, done.stdout
    # Every row but `all` says what its switched-off part cost.
    assert done.stdout.count(" own: ") == len(expected) - 2, done.stdout
