"""The A2A ingress: the routes under `/a2a/<agent>`, each request one `Call` through the pipeline.

The terminal of the pipeline checks task ownership, sends the request to the agent's interface of the
same binding and generation (`agentgw.upstream.a2a`, with the credential the credentials stage put on
the call), and reads the answer: a unary one whole (claiming the tasks it names, filtering task
lists to the caller's own), an SSE one through the relay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from agentgw.call import RUN_ID_HEADER, Action, Call, Reply, checked_run_id
from agentgw.errors import GatewayError, InvalidRunId, UpstreamFailed, UpstreamUnreachable
from agentgw.ingress.a2a.cards import CardSecurity, rewrite_card
from agentgw.ingress.a2a.errors import (
    AgentNotFound,
    InvalidAgentResponse,
    InvalidParams,
    TaskNotFound,
    UnsupportedOperation,
    jsonrpc_error_response,
    rest_error_response,
)
from agentgw.ingress.a2a.messages import (
    SKILL_KEY,
    A2aRequest,
    parse_jsonrpc,
    parse_rest,
    requested_version,
    skill_object,
    task_object,
)
from agentgw.ingress.a2a.relay import ClosingStreamingResponse, Relay, open_relay
from agentgw.ingress.a2a.signatures import CardSigner, UpstreamCardVerifier
from agentgw.ingress.a2a.tasks import MemoryTaskOwners, TaskOwners, answer_task_ids
from agentgw.ingress.body import read_body
from agentgw.pipeline import Pipeline
from agentgw.registry.a2a import (
    A2aAgentSpec,
    A2aRegistry,
    CardSignatureInvalid,
    CardUnavailable,
    UpstreamCard,
    card_skill_ids,
)
from agentgw.upstream.a2a import A2aHttpUpstream
from agentgw.upstream.http import (
    DEFAULT_LIMITS,
    AnswerTooLarge,
    HttpClient,
    Limits,
    UpstreamResponse,
    UpstreamState,
)

__all__ = ["JSON_TYPES", "A2aIngress"]

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json", "application/a2a+json")


@dataclass(slots=True)
class _Answer:
    """A unary answer from the agent; `raw` is None once the gateway changed `message`."""

    status_code: int
    message: Any
    raw: bytes | None
    content_type: str


@dataclass(slots=True)
class _Card:
    card: UpstreamCard


class A2aIngress:
    """Serves `/a2a/<agent>`: classifies each request into a `Call`, runs the pipeline, forwards."""

    def __init__(
        self,
        registry: A2aRegistry,
        pipeline: Pipeline,
        upstream: A2aHttpUpstream,
        owners: TaskOwners,
        *,
        base_url: str,
        security: CardSecurity,
        max_body_bytes: int,
        signer: CardSigner | None = None,
    ) -> None:
        self._registry = registry
        self._signer = signer
        self._pipeline = pipeline
        self._upstream = upstream
        self._owners = owners
        self._base_url = base_url.rstrip("/")
        self._security = security
        self._max_body = max_body_bytes

    @classmethod
    def build(
        cls,
        agents: Sequence[A2aAgentSpec],
        pipeline: Pipeline,
        *,
        base_url: str,
        allow_anonymous: bool,
        max_body_bytes: int,
        signer: CardSigner | None = None,
        limits: Limits = DEFAULT_LIMITS,
        owners: TaskOwners | None = None,
    ) -> A2aIngress:
        """The ingress for the configured agents, with its own pooled client (`limits`, under each
        agent's own) and `owners` (default: in memory, this process only); upstream card signatures
        are checked against each agent's `card_keys`, served cards signed by `signer` when given. The
        agents' credentials are the credentials stage's (in `pipeline`).
        """
        upstream = A2aHttpUpstream(HttpClient(limits=limits))
        verify = UpstreamCardVerifier(upstream.fetch_card)
        registry = A2aRegistry(agents, upstream.fetch_card, verify=verify)
        return cls(
            registry,
            pipeline,
            upstream,
            owners or MemoryTaskOwners(),
            base_url=base_url,
            security=CardSecurity.bearer(required=not allow_anonymous),
            max_body_bytes=max_body_bytes,
            signer=signer,
        )

    def routes(self) -> list[BaseRoute]:
        """The data-plane routes, plain Starlette (the card route first: it is more specific)."""
        return [
            Route("/a2a/{agent}/.well-known/agent-card.json", self.card, methods=["GET"]),
            Route("/a2a/{agent}", self.jsonrpc, methods=["POST"]),
            Route("/a2a/{agent}/{path:path}", self.rest, methods=["GET", "POST", "DELETE"]),
        ]

    async def aclose(self) -> None:
        await self._upstream.aclose()

    def upstream_states(self) -> dict[str, UpstreamState]:
        """What the last request to each agent found."""
        return self._upstream.states()

    def agent_url(self, agent: str) -> str:
        return f"{self._base_url}/a2a/{agent}"

    # --- entry points ---
    async def card(self, request: Request) -> Response:
        """GET the agent's card, rewritten for the caller."""
        spec = self._registry.agent(request.path_params["agent"])
        if spec is None:
            return rest_error_response(AgentNotFound(f"unknown A2A agent {request.path_params['agent']!r}"))
        call = Call(
            protocol="a2a",
            action="list",
            resource=f"a2a:{spec.name}",
            upstream=spec.name,
            method="GetAgentCard",
            reaches_upstream=False,  # served from the gateway's copy of the card
            public=True,  # a client without credentials learns from it how to authenticate
            credentials=request.headers.get("authorization"),
            endpoint=f"/a2a/{spec.name}",
        )

        async def terminal(call: Call) -> Reply:
            card = await self._card_of(spec)
            return Reply(payload=_Card(card), listing=[skill_object(spec.name, s) for s in card.skills])

        try:
            call.run_id = _run_id(request, None)
            reply = await self._pipeline.run(call, terminal)
            assert isinstance(reply.payload, _Card)
            body = self._rewrite(spec, reply.payload.card.document, reply.listing)
        except Exception as exc:
            return rest_error_response(exc)
        headers = {"cache-control": "private, no-cache", "vary": "Authorization"}
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    async def jsonrpc(self, request: Request) -> Response:
        """POST a JSON-RPC request."""
        spec = self._registry.agent(request.path_params["agent"])
        if spec is None:
            return jsonrpc_error_response(
                None, AgentNotFound(f"unknown A2A agent {request.path_params['agent']!r}")
            )
        raw = b""
        try:
            raw = await read_body(request, self._max_body, media_types=JSON_TYPES)
            a2a = parse_jsonrpc(raw)
        except GatewayError as exc:
            return jsonrpc_error_response(_request_id(raw), exc)
        return await self._handle(request, spec, a2a)

    async def rest(self, request: Request) -> Response:
        """Any HTTP+JSON request under `/a2a/<agent>/`."""
        agent = request.path_params["agent"]
        spec = self._registry.agent(agent)
        if spec is None:
            return rest_error_response(AgentNotFound(f"unknown A2A agent {agent!r}"))
        try:
            body = (
                await read_body(request, self._max_body, media_types=JSON_TYPES, required=False)
                if request.method == "POST"
                else b""
            )
            a2a = parse_rest(request.method, request.path_params["path"], _raw_suffix(request, agent), body)
        except GatewayError as exc:
            return rest_error_response(exc)
        return await self._handle(request, spec, a2a)

    # --- the pipeline ---
    async def _handle(self, request: Request, spec: A2aAgentSpec, a2a: A2aRequest) -> Response:
        def refuse(exc: BaseException) -> Response:
            if a2a.binding == "jsonrpc":
                return jsonrpc_error_response(a2a.rpc_id, exc, a2a.op.generation)
            return rest_error_response(exc, a2a.op.generation)

        try:
            requested_version(request.headers)
            action, resource = self._classify(spec, a2a)
            run_id = _run_id(request, a2a.context_id)
        except GatewayError as exc:
            return refuse(exc)
        call = Call(
            protocol="a2a",
            action=action,
            resource=resource,
            upstream=spec.name,
            method=a2a.op.name,
            credentials=request.headers.get("authorization"),
            endpoint=f"/a2a/{spec.name}",
            run_id=run_id,
            session_id=next(iter(a2a.task_refs()), None),
            arguments=a2a.params if a2a.op.kind == "send" else None,
        )
        opened: list[Relay] = []

        async def terminal(call: Call) -> Reply:
            reply = await self._forward(call, spec, a2a, request.headers)
            if isinstance(reply.payload, Relay):
                opened.append(reply.payload)
            return reply

        try:
            reply = await self._pipeline.run(call, terminal)
        except Exception as exc:
            # A stage on the way back refused after the agent started answering: close that answer.
            for relay in opened:
                await relay.abort()
            return refuse(exc)
        return self._render(spec, a2a, reply)

    def _classify(self, spec: A2aAgentSpec, a2a: A2aRequest) -> tuple[Action, str]:
        kind = a2a.op.kind
        if kind == "card":
            return "list", f"a2a:{spec.name}"
        if kind == "send":
            skill = a2a.skill(None)
            if skill is None and spec.default_skill is not None:
                skill = spec.default_skill
                # The agent is told the skill that policy allowed, not left to pick its own default.
                a2a.name_skill(skill)
            if skill is None:
                raise InvalidParams(
                    f"name the skill in metadata.{SKILL_KEY}: A2A agent {spec.name!r} has no default skill"
                )
            return "send", skill_object(spec.name, skill)
        return "call", task_object(spec.name, kind)

    async def _card_of(self, spec: A2aAgentSpec) -> UpstreamCard:
        try:
            return await self._registry.card(spec)
        except CardUnavailable as exc:  # the call itself was never sent
            raise UpstreamUnreachable(str(exc)) from exc

    # --- the terminal: forward to the agent ---
    async def _forward(
        self, call: Call, spec: A2aAgentSpec, a2a: A2aRequest, incoming: Mapping[str, str]
    ) -> Reply:
        card = await self._card_of(spec)
        binding = "JSONRPC" if a2a.binding == "jsonrpc" else "HTTP+JSON"
        interface = card.endpoint(binding, a2a.op.generation)
        if interface is None:
            raise UnsupportedOperation(f"A2A agent {spec.name!r} does not serve the {binding} binding")
        assert call.principal is not None
        for task_id in a2a.task_refs():
            if await self._owners.owner(spec.name, task_id) != call.principal.subject:
                raise TaskNotFound(f"task not found: {task_id[:200]!r}")
        # Only what the credentials stage put on the call goes upstream, whatever the caller sent.
        credential = None
        if call.upstream_authorization:
            credential = (call.upstream_authorization_header, call.upstream_authorization)
        url = interface.url.rstrip("/") + a2a.suffix if a2a.binding == "rest" else interface.url
        response = await self._upstream.send(
            a2a.http_method,
            url,
            incoming,
            a2a.body,
            credential=credential,
            timeout_s=spec.timeout_s,
            stream=a2a.op.streaming,
            agent=spec.name,
            limits=spec.limits,
        )
        content_type = response.headers.get("content-type", "")
        if a2a.op.streaming and response.status_code == 200 and content_type.startswith("text/event-stream"):
            claim = functools.partial(self._claim, call, spec)
            return await open_relay(call, spec.name, spec.timeout_s, a2a, response, claim)
        return await self._unary(call, spec, a2a, response)

    async def _claim(self, call: Call, spec: A2aAgentSpec, task_ids: Iterable[str]) -> None:
        assert call.principal is not None
        for task_id in task_ids:
            if not await self._owners.claim(spec.name, task_id, call.principal.subject):
                # The agent answered about a task someone else created: never relay it.
                raise InvalidAgentResponse(f"A2A agent {spec.name!r} answered about a task of another caller")
            if call.session_id is None:
                call.session_id = task_id

    async def _unary(
        self, call: Call, spec: A2aAgentSpec, a2a: A2aRequest, response: UpstreamResponse
    ) -> Reply:
        status = response.status_code
        if status >= 500:
            # The agent's own failure page is not relayed: it would read as the gateway failing.
            await response.aclose()
            raise UpstreamFailed(f"A2A agent {spec.name!r} failed (HTTP {status})")
        try:
            body = await response.aread()
        except AnswerTooLarge as exc:
            raise InvalidAgentResponse(
                f"A2A agent {spec.name!r} answered more than {response.max_answer_bytes} bytes, "
                "more than the gateway reads whole"
            ) from exc
        finally:
            await response.aclose()
        content_type = response.headers.get("content-type", "application/json")
        try:
            message = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            message = None
        if a2a.binding == "jsonrpc":
            if not isinstance(message, dict) or ("result" in message) == ("error" in message):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered HTTP {status} with something not a JSON-RPC response"
                )
            if "error" in message:
                return Reply(payload=_Answer(status, message, body, content_type), status="upstream_error")
            result = message["result"]
        else:
            if not isinstance(message, dict):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered HTTP {status} with something not JSON"
                )
            if not 200 <= status < 300:
                return Reply(
                    payload=_Answer(status, message, body, content_type), status=f"upstream_{status}"
                )
            result = message
        answer = _Answer(status, message, body, content_type)
        kind = a2a.op.kind
        if kind in ("send", "subscribe"):
            await self._claim(call, spec, answer_task_ids(result))
        elif kind == "list":
            # Filtered or refused, never passed through: an unexpected shape could hold anyone's tasks.
            if not isinstance(result, dict) or not isinstance(result.get("tasks", []), list):
                raise InvalidAgentResponse(f"A2A agent {spec.name!r} answered ListTasks without a task list")
            assert call.principal is not None
            mine = []
            for task in result.get("tasks", []):
                task_id = task.get("id") if isinstance(task, Mapping) else None
                if (
                    isinstance(task_id, str)
                    and await self._owners.owner(spec.name, task_id) == call.principal.subject
                ):
                    mine.append(task)
            # What the caller may see of this page; totals over other callers' tasks are not theirs to know.
            result["tasks"], result["totalSize"] = mine, len(mine)
            answer.raw = None
        elif kind == "card":
            if not isinstance(result, Mapping):
                raise InvalidAgentResponse(
                    f"A2A agent {spec.name!r} answered GetExtendedAgentCard without a card"
                )
            listing = [skill_object(spec.name, s) for s in card_skill_ids(result)]
            return Reply(payload=answer, listing=listing)
        return Reply(payload=answer)

    # --- rendering ---
    def _rewrite(
        self, spec: A2aAgentSpec, card: Mapping[str, Any], listing: Sequence[str] | None
    ) -> dict[str, Any]:
        """The card for the caller, signed by the gateway when it signs cards.

        Raises:
            InvalidAgentResponse: the card cannot be read as an A2A card, so it cannot be signed.
        """
        allowed = set(listing or ())
        skill_ids = [s for s in card_skill_ids(card) if skill_object(spec.name, s) in allowed]
        out = rewrite_card(
            card, agent_url=self.agent_url(spec.name), allowed_skills=skill_ids, security=self._security
        )
        if self._signer is None:
            return out
        try:
            return self._signer.sign(out)
        except CardSignatureInvalid as exc:
            # Signing is configured: an unsigned card would look like a stripped one. Refuse instead.
            message = f"the card of A2A agent {spec.name!r} cannot be signed: {exc}"
            raise InvalidAgentResponse(message) from exc

    def _render(self, spec: A2aAgentSpec, a2a: A2aRequest, reply: Reply) -> Response:
        payload = reply.payload
        if isinstance(payload, Relay):
            return ClosingStreamingResponse(
                payload.events(),
                payload.abort,
                media_type="text/event-stream",
                headers={"cache-control": "no-store", "x-accel-buffering": "no"},
            )
        assert isinstance(payload, _Answer)
        if a2a.op.kind == "card" and reply.listing is not None:
            message = payload.message
            try:
                if a2a.binding == "jsonrpc":
                    message["result"] = self._rewrite(spec, message["result"], reply.listing)
                else:
                    message = self._rewrite(spec, message, reply.listing)
            except InvalidAgentResponse as exc:
                if a2a.binding == "jsonrpc":
                    return jsonrpc_error_response(a2a.rpc_id, exc, a2a.op.generation)
                return rest_error_response(exc, a2a.op.generation)
            payload.message, payload.raw = message, None
        body = payload.raw if payload.raw is not None else orjson.dumps(payload.message)
        return Response(body, status_code=payload.status_code, media_type=payload.content_type.split(";")[0])


def _run_id(request: Request, context_id: str | None) -> str | None:
    """The `Agent-Run-Id` header, else the message's `contextId`.

    Raises:
        InvalidParams: the one it names is not a valid run id.
    """
    run_id = request.headers.get(RUN_ID_HEADER)
    try:
        if run_id:
            return checked_run_id(run_id, "the Agent-Run-Id header")
        return checked_run_id(context_id, "the message's contextId")
    except InvalidRunId as exc:
        raise InvalidParams(exc.message) from exc


def _raw_suffix(request: Request, agent: str) -> str:
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else quote(request.url.path)
    prefix = f"/a2a/{agent}/"
    if prefix in path:
        suffix = "/" + path.split(prefix, 1)[1]
    else:  # the client percent-encoded the prefix: send the path as classified, encoded again
        suffix = "/" + quote(request.path_params["path"], safe="/:@")
    query = request.url.query
    return f"{suffix}?{query}" if query else suffix


def _request_id(raw: bytes) -> Any:
    """The id of a request refused while being classified, when it has a valid one; else null."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    rpc_id = body.get("id") if isinstance(body, dict) else None
    return rpc_id if isinstance(rpc_id, str | int) and not isinstance(rpc_id, bool) else None
