"""Reading a request body the way every ingress must: bounded in size, and JSON only."""

from __future__ import annotations

from collections.abc import Collection

from starlette.requests import Request

from agentgw.errors import PayloadTooLarge, UnsupportedMediaType

__all__ = ["read_body"]

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
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if required and content_type not in media_types:
        raise UnsupportedMediaType("unsupported media type: send application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body too large: the limit is {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not required and body.strip() and content_type not in media_types:
        raise UnsupportedMediaType("unsupported media type: send application/json")
    return body
