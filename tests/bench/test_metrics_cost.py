"""`python -m bench.metrics_cost`: a short run, so that the in-process measurement cannot rot unnoticed."""

from __future__ import annotations

import pytest

from bench.metrics_cost import main, measure


async def test_both_sides_are_measured_for_every_round() -> None:
    without, with_metrics = await measure(runs=200, rounds=2)
    assert len(without) == len(with_metrics) == 2
    assert all(0 <= seconds < 0.01 for seconds in without + with_metrics)


def test_the_command_prints_both_sides_and_the_difference(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--runs", "200", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "without metrics:" in out and "with metrics:" in out and "added per run:" in out
