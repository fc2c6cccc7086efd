"""An agent's SSE answer on its way to the caller: event by event, as each arrives.

The events are read by `agentgw.upstream.a2a.read_agent_events` and relayed as the agent wrote them;
this module only learns from each what the gateway must know (the tasks it names, whether it ends the
exchange), and makes sure the agent's stream is closed and the call settled however the relay ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from agentgw.call import Call, Reply, Usage
from agentgw.errors import GatewayError, UpstreamError, UpstreamTimeout
from agentgw.ingress.a2a.errors import InvalidAgentResponse, jsonrpc_error, rest_error
from agentgw.ingress.a2a.messages import A2aRequest
from agentgw.ingress.a2a.tasks import answer_task_ids, is_final
from agentgw.upstream.a2a import AgentEvent, EventTooLarge, read_agent_events
from agentgw.upstream.http import UpstreamResponse

__all__ = ["ClosingStreamingResponse", "Relay", "event_data", "open_relay"]

log = logging.getLogger(__name__)

# Claims task ids for the caller; raises `InvalidAgentResponse` for a task of another caller.
Claim = Callable[[list[str]], Awaitable[None]]


def event_data(event: AgentEvent) -> Any:
    """An event's data read as JSON; None when it has none or it is not JSON."""
    if event.data is None:
        return None
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None


async def open_relay(
    call: Call, agent: str, timeout_s: float, a2a: A2aRequest, response: UpstreamResponse, claim: Claim
) -> Reply:
    """The streaming reply for an agent's SSE answer, once its first event has arrived.

    The first event is awaited here, inside the pipeline, so that an agent that answers nothing, or
    names another caller's task, fails the call like a unary answer would.

    Raises:
        UpstreamTimeout: no event within `timeout_s`.
        InvalidAgentResponse: the stream ended without an event, or its first event names a task of
            another caller.
        UpstreamError: the agent broke off the stream.
    """
    relay = Relay(call, agent, a2a, response, claim)
    try:
        try:
            with anyio.fail_after(timeout_s):
                first = await relay.next_event()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"A2A agent {agent!r} sent no event within {timeout_s:g}s") from exc
        if first is None:
            raise InvalidAgentResponse(f"A2A agent {agent!r} ended the stream without an event")
        await relay.learn(first)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await relay.close_upstream()
        raise
    relay.first = first
    reply = Reply(payload=relay, streaming=True)
    relay.reply = reply
    return reply


class Relay:
    """An agent's SSE answer on its way to the caller: event by event, as each arrives.

    Task ids named by events are claimed for the caller before the event is passed on. A stream that
    breaks, or ends before a final event, ends with an `error` event; the upstream response is closed
    and the pipeline's settle hooks run exactly once, however the stream ends.
    """

    def __init__(
        self, call: Call, agent: str, a2a: A2aRequest, response: UpstreamResponse, claim: Claim
    ) -> None:
        self._call = call
        self._agent = agent
        self._a2a = a2a
        self._response = response
        self._claim = claim
        self._events = read_agent_events(response)
        self.dropped = False  # the agent's connection broke (not: the agent said something wrong)
        self.first: AgentEvent | None = None
        self.final = False
        self.reply: Reply | None = None
        self._claimed: set[str] = set()
        self._settled = False

    async def next_event(self) -> AgentEvent | None:
        """The agent's next event, or None at the end of its stream.

        Raises:
            UpstreamError: the connection broke (`dropped` is then set).
            InvalidAgentResponse: one event larger than the gateway buffers.
        """
        try:
            return await anext(self._events, None)
        except EventTooLarge as exc:
            raise InvalidAgentResponse(str(exc)) from exc
        except UpstreamError:
            self.dropped = True
            raise

    async def learn(self, event: AgentEvent) -> None:
        """Note what an event says: its task ids (claimed for the caller) and whether it is final.

        Raises:
            InvalidAgentResponse: the event names a task of another caller.
        """
        data = event_data(event)
        if event.name == "error" or (isinstance(data, Mapping) and "error" in data):
            self.final = True
            return
        result = data.get("result") if self._a2a.binding == "jsonrpc" and isinstance(data, Mapping) else data
        new = [t for t in answer_task_ids(result) if t not in self._claimed]
        if new:
            await self._claim(new)
            self._claimed.update(new)
        if is_final(result):
            self.final = True

    def _error_event(self, exc: GatewayError) -> bytes:
        if self._a2a.binding == "jsonrpc":
            payload = jsonrpc_error(self._a2a.rpc_id, exc, self._a2a.op.generation)
        else:
            payload = rest_error(exc, self._a2a.op.generation)
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"

    async def events(self) -> AsyncIterator[bytes]:
        """The bytes relayed to the caller: the agent's events, then an `error` event if it fell short."""
        status = "ok"
        name = self._agent
        try:
            assert self.first is not None
            yield self.first.raw + b"\n\n"
            while True:
                event = await self.next_event()
                if event is None:
                    break
                await self.learn(event)
                yield event.raw + b"\n\n"
            if not self.final:
                status = "upstream_incomplete"
                yield self._error_event(
                    InvalidAgentResponse(
                        f"A2A agent {name!r} ended the stream before the task reached a final state"
                    )
                )
        except GatewayError as exc:
            # The upstream client's message already names the agent ("A2A agent 'x' broke off the stream").
            status = "upstream_dropped" if self.dropped else exc.reason
            yield self._error_event(exc)
        except BaseException:
            status = "client_gone"
            raise
        finally:
            await self._finish(status)

    async def abort(self) -> None:
        """Close the upstream stream without relaying it (a later stage refused the call)."""
        await self._finish("aborted")

    async def close_upstream(self) -> None:
        """Close the agent's answer (and the reader over it); idempotent."""
        await self._events.aclose()
        await self._response.aclose()

    async def _finish(self, status: str) -> None:
        with anyio.CancelScope(shield=True):
            await self.close_upstream()
            if self._settled or self.reply is None:
                return
            self._settled = True
            try:
                await self.reply.settle(Usage(), status)
            except Exception:
                log.exception("settling a streamed A2A answer failed", extra={"agent": self._agent})


class ClosingStreamingResponse(StreamingResponse):
    """A stream that notices a caller going away even while the agent is silent, and runs `on_close`
    however it ends (even if the body was never iterated), so the agent's stream is never left open.

    Starlette stops listening for `http.disconnect` under ASGI spec 2.4 and learns of a departure only
    from a failed send: for a task that stays quiet for an hour, that is an hour of an open upstream.
    """

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the caller went away mid-send
                    finally:
                        group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()
