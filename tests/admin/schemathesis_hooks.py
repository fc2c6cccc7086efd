"""Schemathesis hooks for test_openapi_conformance: what the OpenAPI document can say only in words."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """A PUT names its resource in the path and in the body, and the two must agree: the path
    parameter's description says so, JSON Schema cannot. A case meant to be valid gets the path's
    name in its body too (one meant to be invalid keeps whatever it has)."""
    meta = case.meta
    if (
        case.method == "PUT"
        and meta is not None
        and meta.generation.mode.is_positive
        and isinstance(case.body, dict)
        and isinstance(case.path_parameters, dict)
        and "name" in case.path_parameters
    ):
        case.body["name"] = case.path_parameters["name"]
