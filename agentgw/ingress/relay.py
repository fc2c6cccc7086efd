"""The one way an upstream's streamed answer goes out to the caller, whatever the protocol.

An upstream's answer holds a pooled connection and a place in its upstream's lane (upstream/http.py)
until it is closed, and a streamed reply has its usage to settle. Both must happen however the
response ends: completed, cut by the upstream, or abandoned by a caller who went away, which
Starlette learns of only from a failed send, where a background task would never run.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["RelayResponse"]


class RelayResponse(StreamingResponse):
    """`content` streamed to the caller, then `finish` (close the upstream, settle), always once."""

    def __init__(
        self,
        content: AsyncIterable[bytes],
        finish: Callable[[], Awaitable[None]],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: a caller's departure cancels the response, never the closing of what it held.
            with anyio.CancelScope(shield=True):
                await self._finish()
