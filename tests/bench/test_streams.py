"""`python -m bench.streams` runs both scenarios against this checkout and reports what it measured."""

from __future__ import annotations

import json

import pytest

from bench import streams


def test_starve_reports_short_calls_beside_streams_that_all_got_their_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert streams.main(["starve", "--streams", "3", "--hold", "5", "--short-concurrency", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["streams_answered"], result["streams_refused_busy"]) == (3, 0)
    assert result["short_calls"] > 0 and result["short_errors"] == 0
    assert 0 < result["short_p50_ms"] <= result["short_p99_ms"]


def test_memory_reports_the_gateways_rss_and_what_callers_got(capsys: pytest.CaptureFixture[str]) -> None:
    assert streams.main(["memory", "--answers", "1", "--mb", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rss_before_mb"] > 0 and result["rss_peak_mb"] >= result["rss_before_mb"]
    assert result["callers_got"] == [f"200 {1024 * 1024 + 82} bytes"], "a 1 MB answer is under the cap"
