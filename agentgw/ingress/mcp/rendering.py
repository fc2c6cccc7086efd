"""Gateway errors in MCP's shape, and the run id of an MCP message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from agentgw.call import RUN_ID_HEADER, checked_run_id
from agentgw.errors import (
    GatewayError,
    InsufficientScope,
    SessionNotFound,
    SessionsExhausted,
    TooManySessions,
    Unauthenticated,
    UpstreamBusy,
    UpstreamFailed,
)
from agentgw.ingress.mcp.messages import error_body

__all__ = ["RUN_ID_META", "jsonrpc_error_response", "run_id_of"]

log = logging.getLogger(__name__)

RUN_ID_META = "io.agentgw/runId"
# Refusals of the caller's credentials are HTTP-level (clients start OAuth from them), and so are a
# lost session (the transport must signal it), a session the caps refuse (429, 503: back off), an
# upstream too busy to take the call (503 with Retry-After, for retrying clients and balancers) and an
# upstream's server error (502, where relaying its 500 would blame the gateway); clients read the
# JSON-RPC error in the body at any status. Every other refusal of an admitted message is a JSON-RPC
# error that the client's code sees as the call's outcome.
_HTTP_LEVEL = (
    Unauthenticated,
    InsufficientScope,
    SessionNotFound,
    TooManySessions,
    SessionsExhausted,
    UpstreamBusy,
    UpstreamFailed,
)


def jsonrpc_error_response(msg_id: Any, exc: BaseException, *, in_pipeline: bool = False) -> Response:
    """Render `exc` as a JSON-RPC error response; a foreign exception is an internal error (fail closed)."""
    if not isinstance(exc, GatewayError):
        log.exception("internal error while handling an MCP message", exc_info=exc)
        exc = GatewayError("internal error")
    status = exc.http_status if not in_pipeline or isinstance(exc, _HTTP_LEVEL) else 200
    body = error_body(msg_id, exc.jsonrpc_code, exc.message, exc.data)
    return Response(body, status_code=status, headers=exc.headers, media_type="application/json")


def run_id_of(headers: Mapping[str, str], params: Mapping[str, Any]) -> str | None:
    """The agent run a message belongs to: the `Agent-Run-Id` header, else `_meta["io.agentgw/runId"]`.

    Raises:
        InvalidRunId: the one it names is not a valid run id.
    """
    run_id = headers.get(RUN_ID_HEADER)
    if run_id:
        return checked_run_id(run_id, "the Agent-Run-Id header")
    meta = params.get("_meta")
    value = meta.get(RUN_ID_META) if isinstance(meta, dict) else None
    return checked_run_id(value, f"_meta[{RUN_ID_META!r}]")
