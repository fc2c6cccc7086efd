"""Reading a request body the way every ingress must: bounded in size, and JSON only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from agentgw.errors import PayloadTooLarge, UnsupportedMediaType

__all__ = ["read_body", "read_body_asgi"]

JSON = frozenset({"application/json"})


async def read_body(
    request: Request, limit: int, *, media_types: Collection[str] = JSON, required: bool = True
) -> bytes:
    """Read the body, refusing it as soon as it passes `limit` bytes.

    Args:
        request: the incoming request.
        limit: the largest body accepted, in bytes.
        media_types: the content types accepted.
        required: whether a body must be there; an optional one is checked only when present.

    Raises:
        UnsupportedMediaType: a (required or present) body of another content type.
        PayloadTooLarge: the body is larger than `limit`, declared or streamed.
    """
    content_type = _check_declared(request.headers, limit, media_types, required)
    return await _collect(request.stream(), limit, content_type, media_types, required)


async def read_body_asgi(
    headers: Mapping[str, str], receive: Receive, limit: int, *, media_types: Collection[str] = JSON
) -> bytes:
    """`read_body` for a plain ASGI app: `headers` with lower-case names, the body from `receive`.

    Raises:
        UnsupportedMediaType: the body is not of a type in `media_types`.
        PayloadTooLarge: the body is larger than `limit`, declared or streamed.
        ClientDisconnect: the client went away before the body was complete.
    """
    content_type = _check_declared(headers, limit, media_types, True)
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        # The usual case, a body in one message: no generator to drive.
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
        return body
    return await _collect(_chunks(message, receive), limit, content_type, media_types, True)


async def _chunks(message: Message, receive: Receive) -> AsyncIterator[bytes]:
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return
        message = await receive()


def _check_declared(
    headers: Mapping[str, str], limit: int, media_types: Collection[str], required: bool
) -> str:
    """The request's media type, once its headers are acceptable."""
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if required and content_type not in media_types:
        raise UnsupportedMediaType("unsupported media type: send application/json")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
    return content_type


async def _collect(
    stream: AsyncIterator[bytes], limit: int, content_type: str, media_types: Collection[str], required: bool
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not required and body.strip() and content_type not in media_types:
        raise UnsupportedMediaType("unsupported media type: send application/json")
    return body
