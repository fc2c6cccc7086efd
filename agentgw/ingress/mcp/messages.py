"""JSON-RPC envelopes of MCP: parse, validate against the headers, classify into policy terms.

Policy objects are built here and only here:
    tools      mcp:<server>/<tool>
    prompts    mcp:<server>/prompt/<name>
    resources  mcp:<server>/resource/<uri or uri template>
    others     mcp:<server>/method/<method>   (methods the gateway does not know need a grant too)
Tool and prompt names are percent-encoded outside `[A-Za-z0-9_.-]`, so a name holding `/`, `*` or a
look-alike character can never reach into another object's space or read as a pattern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from mcp.shared.inbound import decode_header_value

from agentgw.call import Action
from agentgw.errors import BadRequest, HeaderMismatch, ParseError

__all__ = [
    "LIST_KEYS",
    "MODERN_VERSION",
    "Message",
    "classify",
    "error_body",
    "item_object",
    "listened_objects",
    "parse",
]

MODERN_VERSION = "2026-07-28"
META_VERSION = "io.modelcontextprotocol/protocolVersion"

# Discovery methods and the key of the result array each one returns.
LIST_KEYS: dict[str, str] = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}
# Messages that reveal no capability: authenticated, audited, not policy-checked.
SESSION_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "logging/setLevel",
        "subscriptions/listen",
        "resources/unsubscribe",
    }
)
# Name-bearing headers of the 2026-07-28 transport, checked against the body before any decision.
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@dataclass(slots=True)
class Message:
    """One parsed JSON-RPC message, its envelope read once (the pass-through asks for it often).

    Attributes:
        body: the message as parsed.
        raw: the bytes it was parsed from (what goes upstream).
        method: the method of a request or notification; None for a response.
        id: the id, None when there is none.
        is_request: a method and an id.
        params: the params object, empty when there is none.
        protocol_version: the `io.modelcontextprotocol/protocolVersion` of `params._meta`, if a string.
        is_modern: `protocol_version` is the 2026-07-28 era or later.
    """

    body: dict[str, Any]
    raw: bytes
    method: str | None
    id: Any
    is_request: bool
    params: Mapping[str, Any]
    protocol_version: str | None
    is_modern: bool

    @classmethod
    def of(cls, body: dict[str, Any], raw: bytes) -> Message:
        method = body.get("method")
        method = method if isinstance(method, str) else None
        params = body.get("params")
        params = params if isinstance(params, dict) else {}
        meta = params.get("_meta")
        version = meta.get(META_VERSION) if isinstance(meta, dict) else None
        version = version if isinstance(version, str) else None
        return cls(
            body,
            raw,
            method,
            body.get("id"),
            method is not None and "id" in body,
            params,
            version,
            version is not None and version >= MODERN_VERSION,
        )


def parse(raw: bytes, headers: Mapping[str, str]) -> Message:
    """Parse one JSON-RPC message and check it against the MCP headers that name it.

    Raises:
        ParseError: not JSON.
        BadRequest: a batch, or not a JSON-RPC 2.0 request, notification or response.
        HeaderMismatch: `Mcp-Method`, `Mcp-Name` or `MCP-Protocol-Version` disagree with the body.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ParseError("parse error: the body is not valid JSON") from exc
    if isinstance(body, list):
        raise BadRequest("JSON-RPC batches are not supported: send one message per request")
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
        raise BadRequest("invalid request: a JSON-RPC 2.0 object is required")
    msg_id = body.get("id")
    if "id" in body and (isinstance(msg_id, bool) or not isinstance(msg_id, str | int)):
        raise BadRequest("invalid request: id must be a string or an integer")
    if "method" in body:
        if not isinstance(body["method"], str) or not body["method"]:
            raise BadRequest("invalid request: method must be a non-empty string")
        if "params" in body and not isinstance(body["params"], dict):
            raise BadRequest("invalid request: params must be an object")
    elif "id" not in body or ("result" in body) == ("error" in body):
        raise BadRequest("invalid request: neither a request, a notification nor a response")
    message = Message.of(body, raw)
    _check_headers(message, headers)
    return message


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Surrounding whitespace is not part of an HTTP field value (RFC 9110 5.5), whatever the server
    # library kept; a value that needs exact bytes travels in the `=?base64?...?=` form.
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip(" \t")
    # Only the sentinel form needs decoding (the SDK's full-match regex costs more than the check).
    return decode_header_value(value) if value.startswith("=?") else value


def _check_headers(message: Message, headers: Mapping[str, str]) -> None:
    method = message.method
    header_method = _header(headers, "mcp-method")
    if "mcp-method" in headers and header_method != method:
        raise HeaderMismatch(f"header mismatch: Mcp-Method {header_method!r} but the body says {method!r}")
    name_param = NAME_PARAM.get(method or "")
    if (
        "mcp-name" in headers
        and name_param
        and _header(headers, "mcp-name") != message.params.get(name_param)
    ):
        raise HeaderMismatch("header mismatch: Mcp-Name does not match the body")
    header_version = _header(headers, "mcp-protocol-version")
    body_version = message.protocol_version
    if header_version and body_version and header_version != body_version:
        raise HeaderMismatch(
            f"header mismatch: MCP-Protocol-Version {header_version!r} but _meta says {body_version!r}"
        )


def _name(name: Any) -> str:
    return quote(name if isinstance(name, str) else "", safe="")


def item_object(server: str, kind: str, item: Mapping[str, Any]) -> str:
    """The policy object of one listed item (`kind` is a `LIST_KEYS` value)."""
    if kind == "tools":
        return f"mcp:{server}/{_name(item.get('name'))}"
    if kind == "prompts":
        return f"mcp:{server}/prompt/{_name(item.get('name'))}"
    uri = item.get("uri") if kind == "resources" else item.get("uriTemplate")
    return f"mcp:{server}/resource/{uri if isinstance(uri, str) else ''}"


def classify(server: str, message: Message) -> tuple[Action, str]:
    """The action and policy object of a message sent to `server`."""
    method = message.method
    params = message.params
    if method == "subscriptions/listen" and (objects := listened_objects(server, message)):
        # Updates of a resource tell what it holds: listening needs `read` on each one, as subscribing
        # does (the rest go in `Call.objects`).
        return "read", objects[0]
    if method is None or method.startswith("notifications/") or method in SESSION_METHODS:
        return "session", f"mcp:{server}"
    if method in LIST_KEYS:
        return "list", f"mcp:{server}"
    if method == "tools/call":
        return "call", item_object(server, "tools", params)
    if method == "prompts/get":
        return "call", item_object(server, "prompts", params)
    if method in ("resources/read", "resources/subscribe"):
        return "read", item_object(server, "resources", params)
    if method == "completion/complete":
        ref = params.get("ref")
        ref = ref if isinstance(ref, dict) else {}
        if ref.get("type") == "ref/prompt":
            return "call", item_object(server, "prompts", ref)
        return "read", item_object(server, "resources", ref)
    return "call", f"mcp:{server}/method/{_name(method)}"


def listened_objects(server: str, message: Message) -> tuple[str, ...]:
    """The policy object of every resource a `subscriptions/listen` asks updates of, in order."""
    notifications = message.params.get("notifications")
    if message.method != "subscriptions/listen" or not isinstance(notifications, dict):
        return ()
    uris = notifications.get("resourceSubscriptions")
    if uris is None:
        return ()
    # Anything but a list of strings is judged too, never skipped (as an empty URI: default deny).
    listed = uris if isinstance(uris, list) else [uris]
    return tuple(item_object(server, "resources", {"uri": uri}) for uri in listed)


def error_body(msg_id: Any, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "error": error})
