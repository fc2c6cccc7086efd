"""A TCP proxy the test controls, to break a store's connections the way real outages do.

    with TcpProxy(5432) as proxy:        # listens on 127.0.0.1:<proxy.port>, relays to 127.0.0.1:5432
        proxy.pause()                    # a hung server: connections stay open, no byte moves either way
        proxy.resume()                   # bytes move again, those held back first
        proxy.cut()                      # every open connection is reset (RST), as by a crash or failover
        proxy.refuse()                   # nothing listens (connections refused), open ones are reset
        proxy.resume()                   # listening again, on the same port
        proxy.lose_answer_after(b"COMMIT")   # the next request holding these bytes reaches the server,
                                             # and its connection is reset when the answer comes back

The proxy runs its own event loop in a thread: the code under test may block its thread (a sync
database driver, or the test's own event loop) without stalling the proxy. Each control call returns
once the proxy has done it. Never stop the machine's own PostgreSQL or Redis: break the path to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["TcpProxy"]

T = TypeVar("T")

HOST = "127.0.0.1"
CONTROL_TIMEOUT_S = 10.0
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class TcpProxy:
    """Relays 127.0.0.1:`port` (chosen at start) to 127.0.0.1:`target_port` until told otherwise."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every relayed connection
        self._marker: bytes | None = None  # lose the answer to the next request holding these bytes
        self._doomed: set[asyncio.StreamWriter] = set()  # clients whose next answer is lost

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._control(self._listen())
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._control(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    # --- control, from the test's thread ---

    def pause(self) -> None:
        """Stop relaying: open and new connections stay open, and no byte moves until `resume`."""
        self._control(self._set_flowing(False))

    def resume(self) -> None:
        """Relay again (what was held back first), and listen again after `refuse`."""
        self._control(self._resume())

    def cut(self) -> None:
        """Reset every open connection; new connections are relayed (or held, while paused)."""
        self._control(self._reset_all())

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        self._control(self._refuse())

    def lose_answer_after(self, marker: bytes) -> None:
        """Relay the next request that holds `marker`, then reset its connection when the answer
        comes back, unread: the server did the work, the client cannot know it (once)."""
        self._control(self._arm(marker))

    async def answer_within(self, call: Awaitable[T], seconds: float) -> T | Exception:
        """What `call` came to (its result or its exception) within `seconds`.

        Past them it raises AssertionError, after `resume`: a call that code under test cannot give up on (a
        thread blocked on a hung server) then finishes, and the test ends instead of hanging.
        """
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            self.resume()
            with contextlib.suppress(Exception):
                await task
            raise AssertionError(f"no answer within {seconds:g}s through the broken proxy")
        try:
            return task.result()
        except Exception as exc:
            return exc

    def _control(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(CONTROL_TIMEOUT_S)

    # --- the relay, on the proxy's loop ---

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(self._relay, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _arm(self, marker: bytes) -> None:
        self._marker = marker

    async def _resume(self) -> None:
        if self._server is None:
            await self._listen()
        await self._set_flowing(True)

    async def _reset_all(self) -> None:
        for writer in list(self._open):
            self._reset(writer)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._reset_all()

    async def _close(self) -> None:
        await self._refuse()
        await self._set_flowing(True)  # held bytes go nowhere now: every pump sees its end and stops
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if relays:
            await asyncio.wait(relays, timeout=CONTROL_TIMEOUT_S / 2)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._open.add(client_writer)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:  # the target refuses: so does the proxy, as far as it can once it accepted
            self._reset(client_writer)
            return
        self._open.add(target_writer)
        await asyncio.gather(
            self._pump(client_reader, target_writer, client_writer, doom=client_writer),
            self._pump(target_reader, client_writer, target_writer),
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        doom: asyncio.StreamWriter | None = None,  # requests go this way: the client they come from
    ) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer in self._doomed:  # the answer to the marked request: lost with its connection
                    self._doomed.discard(writer)
                    self._reset(writer)
                    self._reset(other)
                    return
                if doom is not None and self._marker is not None and self._marker in data:
                    self._marker = None
                    self._doomed.add(doom)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        # One side closed (or was reset): close both, as a server would.
        for end in (writer, other):
            self._open.discard(end)
            end.transport.abort()

    def _reset(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        writer.transport.abort()
