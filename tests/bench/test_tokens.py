"""A short run of `python -m bench tokens`, so that the benchmark cannot rot unnoticed: the counts
it reports are exact (one exchange per caller and node alone, one per caller shared); the costs are
only checked to be there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_tokens_counts_one_exchange_per_caller_when_shared() -> None:
    args = [sys.executable, "-m", "bench", "tokens", "--calls", "24", "--callers", "4", "--lookups", "20"]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"bench tokens failed:\n{done.stdout}\n{done.stderr}"
    rows = dict(
        (f"{cache} {calls}", (int(exchanges), int(actors)))
        for cache, calls, exchanges, actors in re.findall(
            r"^(per node|shared)\s+(sequential|burst)\s+(\d+)\s+(\d+)$", done.stdout, re.MULTILINE
        )
    )
    assert rows["per node sequential"] == (12, 3)  # 4 callers x 3 nodes
    assert rows["shared sequential"] == (4, 1)
    assert 4 <= rows["shared burst"][0] <= 12
    assert re.search(r"round 1 shared\s+hit: mean\s+[\d.]+\s+median\s+[\d.]+", done.stdout), done.stdout
