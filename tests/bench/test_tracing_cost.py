"""`python -m bench.tracing_cost`: a short run, so that the in-process measurement cannot rot unnoticed."""

from __future__ import annotations

import pytest

from bench.tracing_cost import SIDES, main, measure


async def test_every_side_is_measured_for_every_round() -> None:
    found = await measure(runs=100, rounds=2)
    assert set(found) == set(SIDES)
    assert all(len(rounds) == 2 and all(0 <= s < 0.05 for s in rounds) for rounds in found.values())


def test_the_command_prints_every_side(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--runs", "100", "--rounds", "1"])
    out = capsys.readouterr().out
    assert all(f"{side} " in out for side in SIDES) and "added to plain" in out
