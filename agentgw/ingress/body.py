"""Reading a request body the way every ingress must: bounded in size, and JSON only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

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
    return await _read(request.headers, request.stream(), limit, media_types, required)


async def read_body_asgi(
    headers: Mapping[str, str], receive: Receive, limit: int, *, media_types: Collection[str] = JSON
) -> bytes:
    """`read_body` for a plain ASGI app: `headers` with lower-case names, the body from `receive`.

    Raises:
        UnsupportedMediaType: the body is not of a type in `media_types`.
        PayloadTooLarge: the body is larger than `limit`, declared or streamed.
        ClientDisconnect: the client went away before the body was complete.
    """
    return await _read(headers, _chunks(receive), limit, media_types, True)


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _read(
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    limit: int,
    media_types: Collection[str],
    required: bool,
) -> bytes:
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if required and content_type not in media_types:
        raise UnsupportedMediaType("unsupported media type: send application/json")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
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
