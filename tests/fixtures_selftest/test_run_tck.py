"""The A2A TCK runner judges through-the-gateway outcomes against the direct ones and the expected list."""

from pathlib import Path

import pytest
import yaml

from conformance.a2a.run_tck import EXPECTED, KIT, judge, kit_copy

T = "jsonrpc::tests/t.py::"


def test_a_test_that_passes_directly_but_not_through_the_gateway_is_a_regression(
    capsys: pytest.CaptureFixture[str],
) -> None:
    direct = {T + "a": "passed", T + "b": "passed"}
    through = {T + "a": "passed", T + "b": "skipped"}
    assert judge(direct, through, {}) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION through the gateway (skipped): {T}b" in out
    assert out.endswith("a2a-tck: 1 passed, 1 failed, 0 expected failures\n")


def test_a_listed_test_is_not_a_regression_but_a_listed_test_that_passes_is_stale(
    capsys: pytest.CaptureFixture[str],
) -> None:
    direct = {T + "a": "passed", T + "b": "passed"}
    assert judge(direct, {T + "a": "passed", T + "b": "failed"}, {T + "b": "deliberate"}) == 0
    assert capsys.readouterr().out.endswith("a2a-tck: 1 passed, 0 failed, 1 expected failures\n")
    assert judge(direct, {T + "a": "passed", T + "b": "passed"}, {T + "b": "deliberate"}) == 1
    assert f"STALE expected failure (now passes through the gateway): {T}b" in capsys.readouterr().out


def test_a_test_that_fails_directly_is_the_agents_gap_and_not_judged() -> None:
    assert judge({T + "a": "failed"}, {T + "a": "error"}, {}) == 0
    assert judge({T + "a": "failed"}, {}, {}) == 0


def test_a_test_missing_through_the_gateway_is_a_regression() -> None:
    assert judge({T + "a": "passed"}, {}, {}) == 1


def test_every_expected_failure_names_a_transport_and_gives_a_reason() -> None:
    expected = yaml.safe_load(EXPECTED.read_text()) or {}
    for test, reason in expected.items():
        assert test.split("::")[0] in {"jsonrpc", "rest"}, test
        assert isinstance(reason, str) and reason.strip(), test


@pytest.mark.skipif(not KIT.is_dir(), reason="the A2A TCK is not beside the checkout")
def test_the_kits_copy_keeps_the_path_of_the_sut_url(tmp_path: Path) -> None:
    kit = kit_copy(tmp_path)
    source = (kit / "tck" / "transport" / "rest_client.py").read_text()
    assert 'urljoin(self.base_url, "./message:send")' in source
    assert 'urljoin(self.base_url, "/message:send")' not in source
    assert (KIT / "tck" / "transport" / "rest_client.py").read_text().count('"/message:send"') == 1
