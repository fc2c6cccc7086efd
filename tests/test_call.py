"""The pipeline's vocabulary: what every call carries from the start."""

from __future__ import annotations

import re

import pytest

from agentgw.call import Call, checked_run_id
from agentgw.errors import InvalidRunId


def test_every_call_gets_a_request_id_of_its_own() -> None:
    ids = [Call("mcp", "call", "mcp:s/t", "s", "tools/call").request_id for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # as wide as the audit column expects


@pytest.mark.parametrize(
    "run", ["run-7", "0b6f1d2c-3a4b-4c5d-8e9f-0a1b2c3d4e5f", "urn:run:ci/42@host", "a+b=c~d.e_f", "r" * 128]
)
def test_run_ids_of_the_usual_shapes_are_taken_as_they_are(run: str) -> None:
    assert checked_run_id(run, "x") == run


@pytest.mark.parametrize(
    "run", ["r" * 129, "a b", "a\nb", "a\tb", "a\x1bb", "a\u202eb", "a\u200bb", "é", "a;b", 7]
)
def test_anything_else_is_refused_as_invalid_params_naming_where_it_came_from(run: object) -> None:
    with pytest.raises(InvalidRunId, match="invalid run id in the header") as refused:
        checked_run_id(run, "the header")
    assert (refused.value.http_status, refused.value.jsonrpc_code) == (400, -32602)


def test_no_run_id_is_none() -> None:
    assert checked_run_id(None, "x") is None
    assert checked_run_id("", "x") is None
