"""What the admin API's OpenAPI document promises beyond each route's own declarations, and the
pieces that keep the answers to it (checked by tests/admin/test_openapi_conformance.py).

- `Guard`: the dependency every admin router takes for each grant (`read_guard`, `write_guard`).
- `GUARDED` and `ADMIN_DEPENDENCIES`: mounted with every admin router, they document the guard's
  answers (401 without a valid token for `/admin`, 403 without the grant) and the bearer scheme,
  and refuse a scalar query parameter given more than once.
- `errors(...)`: the `{"detail": "..."}` answers a route gives itself (404, 409, ...).
- `invalid(...)`: a 422 in FastAPI's own validation shape, for a check a request model cannot make.
- `method_not_allowed`: a 405 whose `Allow` header names every method of the path.
- `query_without_null`: the document's optional query parameters as a query string can carry them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import Depends, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Route

__all__ = [
    "ADMIN_DEPENDENCIES",
    "GUARDED",
    "ErrorOut",
    "Guard",
    "errors",
    "invalid",
    "method_not_allowed",
    "query_without_null",
    "single_values",
]


# A FastAPI dependency that returns the admitted caller, or raises: 401 without valid credentials, 403
# without the grant. The routers take it as a parameter so that they know nothing of how it decides.
Guard = Callable[..., Awaitable[Any]]


class ErrorOut(BaseModel):
    """Every error the gateway words itself (validation errors have FastAPI's own shape)."""

    detail: str


WHY = {
    400: "The body is not JSON (not even text)",
    401: "No valid token for the admin API",
    403: "Denied by policy: the grant on this admin area is missing",
    404: "Not found",
    409: "Conflicts with what is stored, or owned by the config file",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the errors a route answers with `ErrorOut`.

    The schema is given as JSON content, not as a `model`: FastAPI documents a model under the route's
    own media type, which is not JSON for every route (the audit export).
    """
    content = {"application/json": {"schema": ErrorOut.model_json_schema()}}
    return {code: {"description": WHY[code], "content": content} for code in codes}


def invalid(location: str, name: str | int, message: str, value: Any = None) -> RequestValidationError:
    """A 422 shaped as FastAPI's own (`HTTPValidationError`), for checks a model cannot express."""
    return RequestValidationError(
        [{"type": "value_error", "loc": (location, name), "msg": message, "input": value}]
    )


def _is_list(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return any(_is_list(arg) for arg in get_args(annotation))
    return origin in (list, set, tuple)


def _list_parameters(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params if _is_list(field.field_info.annotation)}
    for sub in dependant.dependencies:
        names |= _list_parameters(sub)
    return names


async def single_values(request: Request) -> None:
    """Refuse `?a=1&a=2` for a scalar `a`: FastAPI would silently take the last value.

    Raises:
        RequestValidationError: a scalar query parameter is given more than once.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or len(request.query_params.multi_items()) == len(
        request.query_params
    ):
        return
    lists = _list_parameters(route.dependant)
    for name in request.query_params:
        values = request.query_params.getlist(name)
        if len(values) > 1 and name not in lists:
            raise invalid("query", name, "give this parameter once", values)


# The guard reads the Authorization header itself; this declares the scheme in the document only.
BEARER = HTTPBearer(auto_error=False, description="A token for the admin API (audience `<base>/admin`)")
ADMIN_DEPENDENCIES = [Security(BEARER), Depends(single_values)]
GUARDED = errors(401, 403)


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        # FastAPI keeps an included router whole, its routes under their full paths (no include prefix).
        nested = getattr(route, "original_router", None)
        if isinstance(nested, APIRouter):
            yield from _routes(nested.routes)
        else:
            yield route


async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """405 naming every method of the path: Starlette names only those of the first route it matched,
    and FastAPI makes one route per method."""
    matching = [
        route
        for route in _routes(request.app.router.routes)
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE
    ]
    # The resource is the path the router tries first: `/admin/budgets/effective`, not `/{name}` too.
    allowed = {
        method for route in matching if route.path == matching[0].path for method in route.methods or ()
    }
    detail = exc.detail if isinstance(exc, HTTPException) else "Method Not Allowed"
    return JSONResponse({"detail": detail}, status_code=405, headers={"Allow": ", ".join(sorted(allowed))})


def query_without_null(document: dict[str, Any]) -> dict[str, Any]:
    """Drop `null` from the document's query parameters, in place: a query string cannot carry one.

    FastAPI documents `x: str | None = None` as `anyOf: [string, null]`, default null; clients (and
    schemathesis) read that as a value to send, and `?x=null` or `?x=false` arrive as strings. An
    optional parameter is one that may be left out (`required: false`), as FastAPI also says.
    """
    for item in document.get("paths", {}).values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {}) if parameter.get("in") == "query" else {}
                options = [option for option in schema.get("anyOf", []) if option != {"type": "null"}]
                if len(options) < len(schema.get("anyOf", [])):
                    del schema["anyOf"]
                    schema.update(options[0] if len(options) == 1 else {"anyOf": options})
                if "default" in schema and schema["default"] is None:
                    del schema["default"]
    return document
