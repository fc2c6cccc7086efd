"""The A2A ingress in-process: pure classification, card rewriting and errors, then the whole ingress
(ASGI) in front of the echo fixture agent (also in-process), with a2a-sdk clients of both bindings
and both generations.

Two principals come from a stand-in token verifier (`Bearer alice` -> `user:alice`), so that the
policy and ownership logic is tested here with the real identity and policy stages; the end-to-end
tests run the same scenarios against a real gateway process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
import orjson
import pytest
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
)
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError
from starlette.applications import Starlette
from starlette.requests import Request

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import (
    BudgetExceeded,
    Forbidden,
    GatewayError,
    InsufficientScope,
    ParseError,
    Unauthenticated,
    UpstreamError,
)
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.credentials import Credentials, MemoryTokenCache
from agentgw.ingress.a2a import (
    SKILL_KEY,
    A2aIngress,
    CardSecurity,
    InvalidAgentResponse,
    InvalidParams,
    MemoryTaskOwners,
    MethodNotFound,
    TaskNotFound,
    VersionNotSupported,
    answer_task_ids,
    is_final,
    jsonrpc_error,
    parse_jsonrpc,
    parse_rest,
    requested_version,
    rest_error,
    rewrite_card,
    skill_object,
    task_object,
)
from agentgw.pipeline import CallNext, ordered
from agentgw.registry.a2a import A2aAgentSpec, A2aRegistry
from agentgw.registry.secrets import Secrets, SecretSource
from agentgw.settings import PACKAGE_POLICIES
from agentgw.upstream.a2a import A2aHttpUpstream
from conformance.fixtures.a2a_agents import Recorder, build_server
from tests.support.servers import Answer, LocalServer, Received, Scripted, unused_url

GW = "http://gw.test"
POLICY = [
    "p, user:alice, a2a:echo/*, *",
    "p, user:alice, a2a:plain/*, *",
    "p, user:alice, a2a:scripted/*, *",
    "p, user:alice, a2a:keyed/*, *",
    "p, user:alice, a2a:apikey/*, *",
    "p, user:alice, a2a:broken/*, *",
    "p, user:alice, a2a:garbage/*, *",
    "p, user:alice, a2a:down/*, *",
    "p, user:bob, a2a:echo/echo, *",
    "p, user:bob, a2a:echo/task/*, call",
    "p, anonymous, a2a:echo/echo, list",
]


# --- pure pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "generation"),
    [(None, "0.3"), ("", "0.3"), ("0.3", "0.3"), ("0.3.0", "0.3"), ("1.0", "1.0"), ("1.2", "1.0")],
)
def test_the_a2a_version_header_picks_the_generation(header: str | None, generation: str) -> None:
    headers = {} if header is None else {"a2a-version": header}
    assert requested_version(headers) == generation


@pytest.mark.parametrize("header", ["2.0", "0.2", "latest", "1.x"])
def test_an_unsupported_a2a_version_is_refused_with_32009(header: str) -> None:
    with pytest.raises(VersionNotSupported) as info:
        requested_version({"a2a-version": header})
    assert info.value.jsonrpc_code == -32009


def rpc(method: str, params: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "method": method, **extra}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


MESSAGE = {"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}}


@pytest.mark.parametrize(
    ("method", "params", "kind", "generation", "streaming", "task_id"),
    [
        ("SendMessage", MESSAGE, "send", "1.0", False, None),
        ("SendStreamingMessage", MESSAGE, "send", "1.0", True, None),
        ("GetTask", {"id": "t1"}, "get", "1.0", False, "t1"),
        ("ListTasks", {}, "list", "1.0", False, None),
        ("CancelTask", {"id": "t1"}, "cancel", "1.0", False, "t1"),
        ("SubscribeToTask", {"id": "t1"}, "subscribe", "1.0", True, "t1"),
        (
            "CreateTaskPushNotificationConfig",
            {"taskId": "t1", "url": "http://x"},
            "push-config",
            "1.0",
            False,
            "t1",
        ),
        ("DeleteTaskPushNotificationConfig", {"taskId": "t1", "id": "p"}, "push-config", "1.0", False, "t1"),
        ("GetExtendedAgentCard", {}, "card", "1.0", False, None),
        ("message/send", MESSAGE, "send", "0.3", False, None),
        ("message/stream", MESSAGE, "send", "0.3", True, None),
        ("tasks/get", {"id": "t1"}, "get", "0.3", False, "t1"),
        ("tasks/cancel", {"id": "t1"}, "cancel", "0.3", False, "t1"),
        ("tasks/resubscribe", {"id": "t1"}, "subscribe", "0.3", True, "t1"),
        ("tasks/pushNotificationConfig/set", {"taskId": "t1"}, "push-config", "0.3", False, "t1"),
        ("tasks/pushNotificationConfig/get", {"id": "t1"}, "push-config", "0.3", False, "t1"),
        ("agent/getAuthenticatedExtendedCard", None, "card", "0.3", False, None),
    ],
)
def test_jsonrpc_methods_of_both_generations_are_classified(
    method: str, params: Any, kind: str, generation: str, streaming: bool, task_id: str | None
) -> None:
    request = parse_jsonrpc(rpc(method, params))
    assert (request.op.kind, request.op.generation, request.op.streaming) == (kind, generation, streaming)
    assert request.task_ids == ([task_id] if task_id else [])
    assert request.rpc_id == 7


@pytest.mark.parametrize(
    ("raw", "error", "code"),
    [
        (b"{not json", ParseError, -32700),
        (b"[]", GatewayError, -32600),
        (b'"text"', GatewayError, -32600),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "GetTask"}', GatewayError, -32600),
        (b'{"jsonrpc": "2.0", "id": true, "method": "GetTask"}', GatewayError, -32600),
        (b'{"jsonrpc": "2.0", "id": 1}', GatewayError, -32600),
        (rpc("tools/call", {}), MethodNotFound, -32601),
        (rpc("GetTask", [1]), InvalidParams, -32602),
        (rpc("GetTask", {}), InvalidParams, -32602),
        (rpc("tasks/get", {"id": 5}), InvalidParams, -32602),
        (rpc("SendMessage", {}), InvalidParams, -32602),
        (rpc("SendMessage", {"message": {"taskId": 5}}), InvalidParams, -32602),
        (rpc("SendMessage", {"message": {"referenceTaskIds": "t1"}}), InvalidParams, -32602),
        (rpc("SendMessage", {"message": {}, "metadata": []}), InvalidParams, -32602),
    ],
)
def test_bad_jsonrpc_requests_are_refused_with_their_a2a_codes(
    raw: bytes, error: type[GatewayError], code: int
) -> None:
    with pytest.raises(error) as info:
        parse_jsonrpc(raw)
    assert jsonrpc_error(1, info.value)["error"]["code"] == code


@pytest.mark.parametrize(
    ("method", "path", "name", "generation", "task_id"),
    [
        ("POST", "message:send", "SendMessage", "1.0", None),
        ("POST", "message:stream", "SendStreamingMessage", "1.0", None),
        ("GET", "tasks", "ListTasks", "1.0", None),
        ("GET", "tasks/t:1", "GetTask", "1.0", "t:1"),
        ("POST", "tasks/t:1:cancel", "CancelTask", "1.0", "t:1"),
        ("GET", "tasks/t1:subscribe", "SubscribeToTask", "1.0", "t1"),
        ("POST", "tasks/t1:subscribe", "SubscribeToTask", "1.0", "t1"),
        ("POST", "tasks/t1/pushNotificationConfigs", "CreateTaskPushNotificationConfig", "1.0", "t1"),
        ("DELETE", "tasks/t1/pushNotificationConfigs/p1", "DeleteTaskPushNotificationConfig", "1.0", "t1"),
        ("GET", "extendedAgentCard", "GetExtendedAgentCard", "1.0", None),
        ("POST", "acme/message:send", "SendMessage", "1.0", None),
        ("GET", "acme/tasks/t1", "GetTask", "1.0", "t1"),
        ("POST", "v1/message:send", "SendMessage", "0.3", None),
        ("GET", "v1/tasks/t1", "GetTask", "0.3", "t1"),
        ("POST", "v1/tasks/t1:cancel", "CancelTask", "0.3", "t1"),
        ("GET", "v1/card", "GetExtendedAgentCard", "0.3", None),
    ],
)
def test_rest_paths_of_both_generations_are_classified(
    method: str, path: str, name: str, generation: str, task_id: str | None
) -> None:
    body = orjson.dumps(MESSAGE) if path.endswith("message:send") or path.endswith("message:stream") else b""
    request = parse_rest(method, path, "/" + path, body)
    assert (request.op.name, request.op.generation) == (name, generation)
    assert request.task_ids == ([task_id] if task_id else [])
    assert request.suffix == "/" + path


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("GET", "message:send", b"", MethodNotFound),
        ("DELETE", "tasks/t1", b"", MethodNotFound),
        ("GET", "v1/nothing", b"", MethodNotFound),
        ("GET", "", b"", MethodNotFound),
        ("GET", "tasks/mine/pushNotificationConfigs/..", b"", MethodNotFound),
        ("GET", "../tasks/t1", b"", MethodNotFound),
        ("POST", "message:send", b"{bad", ParseError),
        ("POST", "message:send", b"[1]", InvalidParams),
        ("POST", "message:send", b"{}", InvalidParams),
    ],
)
def test_bad_rest_requests_are_refused(
    method: str, path: str, body: bytes, error: type[GatewayError]
) -> None:
    with pytest.raises(error):
        parse_rest(method, path, "/" + path, body)


def send_request(params: dict[str, Any]) -> Any:
    return parse_jsonrpc(rpc("SendMessage", params))


def test_the_skill_comes_from_request_or_message_metadata_else_the_default() -> None:
    message = {"messageId": "m", "parts": []}
    assert send_request({"message": message, "metadata": {SKILL_KEY: "a"}}).skill(None) == "a"
    assert send_request({"message": {**message, "metadata": {SKILL_KEY: "b"}}}).skill(None) == "b"
    assert send_request({"message": message}).skill("dflt") == "dflt"
    assert send_request({"message": message}).skill(None) is None
    both = {"message": {**message, "metadata": {SKILL_KEY: "a"}}, "metadata": {SKILL_KEY: "a"}}
    assert send_request(both).skill(None) == "a"


@pytest.mark.parametrize(
    "params",
    [
        {"message": {"metadata": {SKILL_KEY: "a"}}, "metadata": {SKILL_KEY: "b"}},
        {"message": {"metadata": {SKILL_KEY: 3}}},
        {"message": {}, "metadata": {SKILL_KEY: ""}},
    ],
)
def test_conflicting_or_malformed_skills_are_invalid_params(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidParams):
        send_request(params).skill("dflt")


def test_a_message_refers_to_its_task_and_referenced_tasks() -> None:
    message = {"taskId": "t1", "referenceTaskIds": ["t2", "t3"], "contextId": "c"}
    request = send_request({"message": message})
    assert request.task_refs() == ["t1", "t2", "t3"]
    assert request.context_id == "c"


def test_skill_objects_are_percent_encoded_so_no_skill_can_pose_as_a_task_object() -> None:
    assert skill_object("echo", "shout") == "a2a:echo/shout"
    assert skill_object("echo", "task/get") == "a2a:echo/task%2Fget"
    assert skill_object("echo", "a*") == "a2a:echo/a%2A"
    assert task_object("echo", "get") == "a2a:echo/task/get"
    assert skill_object("echo", "task/get") != task_object("echo", "get")


def test_task_ids_are_read_from_answers_of_both_generations() -> None:
    assert answer_task_ids({"task": {"id": "t1"}}) == ["t1"]
    assert answer_task_ids({"message": {"taskId": "t2"}}) == ["t2"]
    assert answer_task_ids({"statusUpdate": {"taskId": "t3"}}) == ["t3"]
    assert answer_task_ids({"artifactUpdate": {"taskId": "t4"}}) == ["t4"]
    assert answer_task_ids({"kind": "task", "id": "t5"}) == ["t5"]
    assert answer_task_ids({"kind": "status-update", "taskId": "t6"}) == ["t6"]
    assert answer_task_ids({"status_update": {"task_id": "t7"}}) == ["t7"]
    assert answer_task_ids({"msg": {"taskId": "t8"}}) == ["t8"]
    assert answer_task_ids({"message": {"messageId": "m"}}) == []
    assert answer_task_ids(["t7"]) == []
    assert answer_task_ids({"task": {"id": 8}}) == []


@pytest.mark.parametrize(
    ("event", "final"),
    [
        ({"task": {"id": "t", "status": {"state": "TASK_STATE_SUBMITTED"}}}, False),
        ({"task": {"id": "t", "status": {"state": "TASK_STATE_COMPLETED"}}}, True),
        ({"statusUpdate": {"status": {"state": "TASK_STATE_WORKING"}}}, False),
        ({"statusUpdate": {"status": {"state": "TASK_STATE_CANCELED"}}}, True),
        ({"statusUpdate": {"status": {"state": "TASK_STATE_INPUT_REQUIRED"}}}, True),
        ({"artifactUpdate": {"taskId": "t"}}, False),
        ({"message": {"messageId": "m"}}, True),
        ({"kind": "status-update", "status": {"state": "working"}, "final": False}, False),
        ({"kind": "status-update", "status": {"state": "completed"}, "final": True}, True),
        ({"kind": "task", "status": {"state": "failed"}}, True),
        ({"kind": "message", "messageId": "m"}, True),
        ({"statusUpdate": {"status": {"state": "TASK_STATE_CANCELLED"}}}, True),
        ({"statusUpdate": {"status": {"state": "TASK_STATE_WORKING"}, "final": True}}, True),
        ({"status_update": {"status": {"state": "TASK_STATE_COMPLETED"}}}, True),
        ({"msg": {"messageId": "m"}}, True),
        (None, False),
    ],
)
def test_a_stream_ends_with_a_message_or_a_final_or_interrupted_state(event: Any, final: bool) -> None:
    assert is_final(event) is final


UPSTREAM_CARD: dict[str, Any] = {
    "name": "planner",
    "description": "plans",
    "version": "1.0.0",
    "supportedInterfaces": [
        {"url": "http://agent:9000", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        {
            "url": "http://agent:9000/rest",
            "protocolBinding": "HTTP+JSON",
            "protocolVersion": "1.0",
            "tenant": "t",
        },
        {"url": "agent:9001", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
        {"url": "http://agent:9000", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
    ],
    "capabilities": {"streaming": True, "extendedAgentCard": True},
    "securitySchemes": {"upstream": {"apiKeySecurityScheme": {"location": "header", "name": "X-Key"}}},
    "securityRequirements": [{"schemes": {"upstream": {"list": []}}}],
    "skills": [
        {
            "id": "plan",
            "name": "plan",
            "tags": [],
            "securityRequirements": [{"schemes": {"upstream": {"list": ["x"]}}}],
        },
        {"id": "secret", "name": "secret", "tags": []},
    ],
    "signatures": [{"protected": "e30", "signature": "sig"}],
    "url": "http://agent:9000",
    "preferredTransport": "JSONRPC",
    "protocolVersion": "0.3",
    "additionalInterfaces": [
        {"url": "agent:9001", "transport": "GRPC"},
        {"url": "http://agent:9000", "transport": "JSONRPC"},
    ],
    "security": [{"upstream": []}],
}


def test_the_rewritten_card_points_every_interface_at_the_gateway_and_drops_grpc() -> None:
    card = rewrite_card(
        UPSTREAM_CARD,
        agent_url=f"{GW}/a2a/planner",
        allowed_skills={"plan"},
        security=CardSecurity.bearer(required=True),
    )
    assert card["supportedInterfaces"] == [
        {"url": f"{GW}/a2a/planner", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
        {"url": f"{GW}/a2a/planner", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0", "tenant": "t"},
        {"url": f"{GW}/a2a/planner", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
    ]
    assert card["url"] == f"{GW}/a2a/planner"
    assert card["preferredTransport"] == "JSONRPC"
    assert card["additionalInterfaces"] == [{"url": f"{GW}/a2a/planner", "transport": "JSONRPC"}]
    assert "agent:900" not in orjson.dumps(card).decode()


def test_the_rewritten_card_has_the_gateways_security_only_allowed_skills_and_no_stale_signature() -> None:
    card = rewrite_card(
        UPSTREAM_CARD,
        agent_url=f"{GW}/a2a/planner",
        allowed_skills={"plan"},
        security=CardSecurity.bearer(required=True),
    )
    assert list(card["securitySchemes"]) == ["agentgw"]
    assert card["securitySchemes"]["agentgw"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["securitySchemes"]["agentgw"]["type"] == "http"  # the 0.3 fields, for 0.3 readers
    assert card["securityRequirements"] == [{"schemes": {"agentgw": {"list": []}}}]
    assert card["security"] == [{"agentgw": []}]
    assert [s["id"] for s in card["skills"]] == ["plan"]
    assert "securityRequirements" not in card["skills"][0]
    assert "signatures" not in card
    assert card["name"] == "planner" and card["capabilities"] == UPSTREAM_CARD["capabilities"]
    assert UPSTREAM_CARD["skills"][0]["securityRequirements"], "the upstream card is left untouched"


def test_a_card_for_anonymous_callers_requires_nothing_and_may_list_no_skill() -> None:
    card = rewrite_card(
        UPSTREAM_CARD,
        agent_url=f"{GW}/a2a/planner",
        allowed_skills=(),
        security=CardSecurity.bearer(required=False),
    )
    assert "securityRequirements" not in card and "security" not in card
    assert card["skills"] == []


def test_a_0_3_card_stays_0_3_shaped() -> None:
    legacy = {
        "name": "old",
        "url": "http://old:1",
        "preferredTransport": "GRPC",
        "protocolVersion": "0.3.0",
        "additionalInterfaces": [{"url": "http://old:1/rest", "transport": "HTTP+JSON"}],
        "skills": [{"id": "a", "security": [{"x": []}]}],
        "securitySchemes": {"x": {"type": "apiKey", "in": "header", "name": "X"}},
    }
    card = rewrite_card(
        legacy, agent_url=f"{GW}/a2a/old", allowed_skills={"a"}, security=CardSecurity.bearer(required=True)
    )
    assert "supportedInterfaces" not in card
    assert card["url"] == f"{GW}/a2a/old"
    assert card["preferredTransport"] == "HTTP+JSON"
    assert card["securitySchemes"] == {
        "agentgw": CardSecurity.bearer(required=True).legacy_schemes["agentgw"]
    }
    assert card["skills"] == [{"id": "a"}]


@pytest.mark.parametrize(
    ("error", "code", "status", "reason"),
    [
        (TaskNotFound("task not found"), -32001, 404, "TASK_NOT_FOUND"),
        (VersionNotSupported("v"), -32009, 400, "VERSION_NOT_SUPPORTED"),
        (MethodNotFound("m"), -32601, 404, "METHOD_NOT_FOUND"),
        (InvalidParams("p"), -32602, 400, "INVALID_PARAMS"),
        (InvalidAgentResponse("a"), -32006, 502, "INVALID_AGENT_RESPONSE"),
        (Forbidden("denied"), -32043, 403, "DENIED_BY_POLICY"),
        (InsufficientScope("scope"), -32043, 403, "INSUFFICIENT_SCOPE"),
        (Unauthenticated("who"), -32041, 401, "UNAUTHENTICATED"),
        (BudgetExceeded("spent"), -32029, 429, "BUDGET_EXCEEDED"),
        (UpstreamError("down"), -32603, 502, "INTERNAL_ERROR"),
    ],
)
def test_errors_keep_a2a_codes_and_gateway_refusals_never_borrow_them(
    error: GatewayError, code: int, status: int, reason: str
) -> None:
    body = jsonrpc_error("r", error)
    assert body["id"] == "r" and body["error"]["code"] == code and body["error"]["message"] == error.message
    assert body["error"]["data"][0]["reason"] == reason
    assert "data" not in jsonrpc_error("r", error, "0.3")["error"]
    rest = rest_error(error)["error"]
    assert (rest["code"], rest["details"][0]["reason"]) == (status, reason)


async def test_task_owners_keep_the_first_owner_and_forget_the_oldest_beyond_capacity() -> None:
    owners = MemoryTaskOwners(capacity=2)
    assert await owners.claim("echo", "t1", "user:alice")
    assert await owners.claim("echo", "t1", "user:alice")
    assert not await owners.claim("echo", "t1", "user:bob")
    assert await owners.claim("other", "t1", "user:bob"), "ownership is per agent"
    assert await owners.claim("echo", "t2", "user:bob")
    assert await owners.owner("echo", "t1") is None, "the oldest entry went first"
    assert await owners.owner("echo", "t2") == "user:bob"


# --- the ingress in-process -----------------------------------------------------------------------


class Names:
    """Stand-in verifier until tokens exist in tests: `Bearer alice` is `user:alice`."""

    async def verify(self, credential: str, resource: str) -> Principal:
        if not credential.isalpha():
            raise Unauthenticated("unknown token")
        return Principal(subject=f"user:{credential}")


@dataclass
class Calls:
    """Audit slot: every call the pipeline saw, with how it ended."""

    seen: list[tuple[Call, str]] = field(default_factory=list)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        try:
            reply = await call_next(call)
        except GatewayError as exc:
            self.seen.append((call, exc.reason))
            raise
        self.seen.append((call, "streaming" if reply.streaming else reply.status))
        return reply


@dataclass
class Settles:
    """Budget slot: how each streamed answer was settled (its final status)."""

    statuses: list[str] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        reply = await call_next(call)
        if reply.streaming:

            async def settle(usage: Usage) -> None:
                self.statuses.append(reply.status)
                self.done.set()

            reply.on_settle(settle)
        return reply


def sse_answer(events: list[bytes], end: Literal["end", "drop", "hang"]) -> Answer:
    """The scripted agent's SSE answer: `events`, then `end` (`end`: clean end, `drop`: the connection
    breaks, `hang`: silence until the gateway goes away); its `closed` is set once the agent is done."""
    return Answer(200, events, {"content-type": "text/event-stream"}, end)


def scripted_card(url: str) -> dict[str, Any]:
    return {
        "name": "scripted",
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": url, "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"},
        ],
        "skills": [{"id": "s", "name": "s", "tags": []}],
    }


@dataclass
class Gateway:
    app: Starlette
    ingress: A2aIngress
    echo: Recorder
    calls: Calls
    settles: Settles
    scripts: list[Answer]
    scripted_requests: list[Received]
    credentials: Credentials

    def http(self, user: str | None = "alice") -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {user}"} if user else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url=GW, headers=headers)

    async def client(self, user: str | None = "alice", binding: str = "JSONRPC", version: str = "1.0") -> Any:
        """An a2a-sdk client for the echo agent through the gateway, resolved from the gateway's card."""
        http = self.http(user)
        card = await A2ACardResolver(http, f"{GW}/a2a/echo").get_agent_card()
        keep = [i for i in card.supported_interfaces if i.protocol_version == version]
        narrowed = AgentCard()
        narrowed.CopyFrom(card)
        del narrowed.supported_interfaces[:]
        narrowed.supported_interfaces.extend(keep)
        config = ClientConfig(httpx_client=http, streaming=False, supported_protocol_bindings=[binding])
        return ClientFactory(config).create(narrowed)

    def upstream_requests(self) -> list[dict[str, Any]]:
        return list(self.echo.received)


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    """The ingress (in-process) in front of two agents on 127.0.0.1: the echo fixture agent, and a
    scripted one whose SSE answers a test queues in `scripts`."""
    monkeypatch.setenv("A2A_TEST_SECRET", "s3cret")
    echo_server, scripted_server = LocalServer(), LocalServer()
    echo = build_server(["echo"], echo_server.url)
    scripts: list[Answer] = []
    scripted = Scripted(lambda _: scripts.pop(0))
    upstream = A2aHttpUpstream()
    card = f"{echo_server.url}/echo/.well-known/agent-card.json"
    agents = [
        A2aAgentSpec(name="echo", card_url=card),
        A2aAgentSpec(name="plain", card_url=card, default_skill="shout"),
        A2aAgentSpec(name="keyed", card_url=card, credential={"mode": "static", "secret": "a2a-secret"}),
        A2aAgentSpec(
            name="apikey",
            card=scripted_card(scripted_server.url),
            credential={"mode": "static", "secret": "a2a-secret", "header": "X-Api-Key", "scheme": ""},
        ),
        A2aAgentSpec(name="scripted", card=scripted_card(scripted_server.url), timeout_s=5),
        A2aAgentSpec(name="broken", card_url=f"{echo_server.url}/_fixture/card-500"),
        A2aAgentSpec(name="garbage", card_url=f"{echo_server.url}/_fixture/card-garbage"),
        A2aAgentSpec(name="down", card_url=f"{unused_url()}/.well-known/agent-card.json"),
    ]
    secrets = Secrets({"a2a-secret": SecretSource(env="A2A_TEST_SECRET")})
    registry = A2aRegistry(agents, upstream.fetch_card)
    credentials = Credentials(agents={a.name: a.credentialed() for a in agents}.get, secrets=secrets)
    calls, settles = Calls(), Settles()
    authorizer = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, POLICY)
    pipeline = ordered(
        audit=calls,
        authenticate=Authenticate(Names(), allow_anonymous=True, base_url=GW),
        authorize=Authorize(authorizer),
        budget=settles,
        credentials=credentials,
    )
    ingress = A2aIngress(
        registry,
        pipeline,
        upstream,
        MemoryTaskOwners(),
        base_url=GW,
        security=CardSecurity.bearer(required=False),
        max_body_bytes=64 * 1024,
    )
    async with echo_server.serve(echo), scripted_server.serve(scripted):
        try:
            yield Gateway(
                Starlette(routes=ingress.routes()),
                ingress,
                echo,
                calls,
                settles,
                scripts,
                scripted.received,
                credentials,
            )
        finally:
            await ingress.aclose()


def hello(skill: str | None = None, **message: Any) -> SendMessageRequest:
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER, message_id=os.urandom(8).hex(), parts=[Part(text="hi")], **message
        )
    )
    if skill is not None:
        request.metadata.update({SKILL_KEY: skill})
    return request


async def send(client: Any, request: SendMessageRequest) -> Task:
    async for event in client.send_message(request):
        assert event.HasField("task"), event
        task: Task = event.task
        return task
    raise AssertionError("no answer")


BINDINGS = [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0"), ("JSONRPC", "0.3"), ("HTTP+JSON", "0.3")]


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_message_goes_through_to_the_agent_and_its_task_can_be_read(
    gateway: Gateway, binding: str, version: str
) -> None:
    client = await gateway.client("alice", binding, version)
    task = await send(client, hello("shout"))
    assert task.artifacts[0].parts[0].text == "HI"
    again = await client.get_task(GetTaskRequest(id=task.id))
    assert again.id == task.id
    sent = gateway.upstream_requests()[0]
    assert sent["skill"] == "shout" and sent["a2a_version"] == version


async def test_two_principals_see_different_skills_in_the_card_and_in_the_extended_card(
    gateway: Gateway,
) -> None:
    skills: dict[str | None, list[str]] = {}
    extended: dict[str | None, list[str]] = {}
    for user in ("alice", "bob", None):
        response = await gateway.http(user).get("/a2a/echo/.well-known/agent-card.json")
        assert response.status_code == 200
        assert response.headers["cache-control"].startswith("private")
        skills[user] = [s["id"] for s in response.json()["skills"]]
        if user is not None:
            client = await gateway.client(user)
            card = await client.get_extended_agent_card(GetExtendedAgentCardRequest())
            extended[user] = [s.id for s in card.skills]
            assert all(i.url == f"{GW}/a2a/echo" for i in card.supported_interfaces)
    assert skills == {"alice": ["echo", "shout"], "bob": ["echo"], None: ["echo"]}
    assert extended == {"alice": ["echo", "shout", "secret"], "bob": ["echo"]}
    listed = [c for c, _ in gateway.calls.seen if c.action == "list"]
    assert {c.resource for c in listed} == {"a2a:echo"}
    assert all(c.endpoint == "/a2a/echo" for c in listed)


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_denied_skill_is_refused_before_the_agent(
    gateway: Gateway, binding: str, version: str
) -> None:
    client = await gateway.client("bob", binding, version)
    with pytest.raises(A2AClientError):
        await send(client, hello("shout"))
    with pytest.raises(A2AClientError):
        await send(client, hello("no-such-skill"))
    assert gateway.upstream_requests() == []
    reasons = [(c.resource, reason) for c, reason in gateway.calls.seen if c.action == "send"]
    assert reasons == [("a2a:echo/shout", "denied_by_policy"), ("a2a:echo/no-such-skill", "denied_by_policy")]


async def test_a_denial_names_the_refusal_and_is_not_an_a2a_error_code(gateway: Gateway) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "SendMessage",
        "params": {**MESSAGE, "metadata": {SKILL_KEY: "shout"}},
    }
    response = await gateway.http("bob").post("/a2a/echo", json=body, headers={"a2a-version": "1.0"})
    assert response.status_code == 200
    assert response.json()["id"] == 3
    assert response.json()["error"]["code"] == -32043
    assert "denied by policy" in response.json()["error"]["message"]
    rest = await gateway.http("bob").post(
        "/a2a/echo/message:send", json=body["params"], headers={"a2a-version": "1.0"}
    )
    assert rest.status_code == 403
    assert rest.json()["error"]["details"][0]["reason"] == "DENIED_BY_POLICY"


async def test_a_message_without_a_skill_is_refused_unless_the_agent_has_a_default(gateway: Gateway) -> None:
    client = await gateway.client("alice")
    with pytest.raises(InvalidParamsError, match=r"metadata\.skill"):
        await send(client, hello())
    assert gateway.upstream_requests() == []
    plain = gateway.http("alice")
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": MESSAGE}
    answer = (await plain.post("/a2a/plain", json=body, headers={"a2a-version": "1.0"})).json()
    assert answer["result"]["task"]["artifacts"][0]["parts"][0]["text"] == "HI", "the default skill is shout"
    assert [c.resource for c, _ in gateway.calls.seen if c.action == "send"] == ["a2a:plain/shout"]


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_task_is_invisible_to_every_other_principal(
    gateway: Gateway, binding: str, version: str
) -> None:
    alice = await gateway.client("alice", binding, version)
    bob = await gateway.client("bob", binding, version)
    task = await send(alice, hello("echo"))
    mine = await send(bob, hello("echo"))
    before = len(gateway.upstream_requests())
    with pytest.raises(TaskNotFoundError):
        await bob.get_task(GetTaskRequest(id=task.id))
    with pytest.raises(TaskNotFoundError):
        await bob.cancel_task(CancelTaskRequest(id=task.id))
    with pytest.raises(TaskNotFoundError):
        await send(bob, hello("echo", task_id=task.id))
    if (binding, version) != ("HTTP+JSON", "0.3"):  # 0.3 HTTP+JSON messages cannot refer to tasks
        with pytest.raises(TaskNotFoundError):
            await send(bob, hello("echo", reference_task_ids=[task.id]))
    with pytest.raises(TaskNotFoundError):
        await bob.get_task(GetTaskRequest(id="never-created"))
    assert len(gateway.upstream_requests()) == before, "refused before the agent"
    assert (await bob.get_task(GetTaskRequest(id=mine.id))).id == mine.id
    if version == "1.0":
        listed = await bob.list_tasks(ListTasksRequest())
        assert [t.id for t in listed.tasks] == [mine.id] and listed.total_size == 1
        assert [t.id for t in (await alice.list_tasks(ListTasksRequest())).tasks] == [task.id]


SKILLED = {"metadata": {SKILL_KEY: "echo"}}


@pytest.mark.parametrize(
    ("path", "version", "body"),
    [
        (
            "",
            "1.0",
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "SendMessage",
                "params": {"message": {"task_id": "T"}, **SKILLED},
            },
        ),
        (
            "",
            "0.3",
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "message/send",
                "params": {"message": {"taskId": "T"}, **SKILLED},
            },
        ),
        ("", "1.0", {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "T"}}),
        (
            "",
            "0.3",
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tasks/pushNotificationConfig/set",
                "params": {"task_id": "T"},
            },
        ),
        ("/v1/message:send", "0.3", {"request": {"task_id": "T"}, **SKILLED}),
        ("/message:send", "1.0", {"message": {"reference_task_ids": ["T"]}, **SKILLED}),
        ("/tasks/mine/pushNotificationConfigs", "1.0", {"taskId": "T", "url": "http://x"}),
    ],
)
async def test_no_spelling_of_a_task_id_reaches_another_callers_task(
    gateway: Gateway, path: str, version: str, body: dict[str, Any]
) -> None:
    created = await gateway.http("alice").post(
        "/a2a/echo/message:send", json={**MESSAGE, **SKILLED}, headers={"a2a-version": "1.0"}
    )
    alice_task = created.json()["task"]["id"]
    await gateway.ingress._owners.claim("echo", "mine", "user:bob")
    raw = orjson.dumps(body).replace(b'"T"', orjson.dumps(alice_task))
    before = len(gateway.upstream_requests())
    headers = {"content-type": "application/json", "a2a-version": version}
    response = await gateway.http("bob").post(f"/a2a/echo{path}", content=raw, headers=headers)
    assert "-32001" in response.text or "TASK_NOT_FOUND" in response.text, response.text
    assert len(gateway.upstream_requests()) == before


async def test_every_call_carries_run_context_and_task_for_budgets_and_audit(gateway: Gateway) -> None:
    http = gateway.http("alice")
    params = {"message": {**MESSAGE["message"], "contextId": "ctx-1"}, "metadata": {SKILL_KEY: "echo"}}
    first = await http.post("/a2a/echo/message:send", json=params, headers={"a2a-version": "1.0"})
    task_id = first.json()["task"]["id"]
    followed = {
        "message": {**params["message"], "messageId": "m2", "taskId": task_id},
        "metadata": params["metadata"],
    }
    await http.post(
        "/a2a/echo/message:send", json=followed, headers={"a2a-version": "1.0", "agent-run-id": "run-9"}
    )
    await http.get(f"/a2a/echo/tasks/{task_id}", headers={"a2a-version": "1.0"})
    seen = [
        (c.action, c.resource, c.method, c.run_id, c.session_id, c.protocol) for c, _ in gateway.calls.seen
    ]
    assert seen == [
        ("send", "a2a:echo/echo", "SendMessage", "ctx-1", task_id, "a2a"),
        ("send", "a2a:echo/echo", "SendMessage", "run-9", task_id, "a2a"),
        ("call", "a2a:echo/task/get", "GetTask", None, task_id, "a2a"),
    ]
    assert gateway.calls.seen[0][0].arguments == params


async def test_unknown_agents_are_404_on_every_route(gateway: Gateway) -> None:
    http = gateway.http("alice")
    card = await http.get("/a2a/nope/.well-known/agent-card.json")
    rpc_answer = await http.post(
        "/a2a/nope", json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "t"}}
    )
    rest = await http.get("/a2a/nope/tasks/t")
    assert (card.status_code, rpc_answer.status_code, rest.status_code) == (404, 404, 404)
    assert "unknown A2A agent 'nope'" in rpc_answer.json()["error"]["message"]
    assert rest.json()["error"]["status"] == "NOT_FOUND"
    assert gateway.calls.seen == []


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{oops", {"content-type": "application/json"}, 200, -32700),
        (b'{"jsonrpc": "2.0", "id": 4, "method": "Nope"}', {"content-type": "application/json"}, 200, -32601),
        (
            b'{"jsonrpc": "2.0", "id": 4, "method": "GetTask", "params": {"id": "t"}}',
            {"content-type": "text/plain"},
            415,
            -32600,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 4, "method": "GetTask", "params": {"id": "t"}}',
            {"content-type": "application/json", "a2a-version": "9.0"},
            200,
            -32009,
        ),
        (b" " * (65 * 1024), {"content-type": "application/json"}, 413, -32600),
    ],
)
async def test_bad_jsonrpc_input_gets_a_clear_a2a_error_and_never_reaches_the_agent(
    gateway: Gateway, content: bytes, headers: dict[str, str], status: int, code: int
) -> None:
    response = await gateway.http("alice").post("/a2a/echo", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    if code == -32601:
        assert response.json()["id"] == 4
    assert gateway.echo.received == []


@pytest.mark.parametrize(
    ("agent", "text"),
    [("broken", "answered HTTP 500"), ("garbage", "not JSON"), ("down", "unreachable")],
)
async def test_card_fetch_failures_are_clear_errors(gateway: Gateway, agent: str, text: str) -> None:
    http = gateway.http("alice")
    card = await http.get(f"/a2a/{agent}/.well-known/agent-card.json")
    assert card.status_code == 502
    assert f"the agent card of {agent!r} could not be fetched" in card.json()["error"]["message"]
    assert text in card.json()["error"]["message"]
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {**MESSAGE, "metadata": {SKILL_KEY: "x"}},
    }
    answer = await http.post(f"/a2a/{agent}", json=body, headers={"a2a-version": "1.0"})
    assert answer.json()["error"]["code"] == -32603
    assert "could not be fetched" in answer.json()["error"]["message"]


async def test_the_agent_gets_the_gateways_credential_and_never_the_callers(gateway: Gateway) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {**MESSAGE, "metadata": {SKILL_KEY: "echo"}},
    }
    for agent in ("keyed", "echo", "keyed"):
        await gateway.http("alice").post(f"/a2a/{agent}", json=body, headers={"a2a-version": "1.0"})
    authorizations = [r["authorization"] for r in gateway.upstream_requests()]
    assert authorizations == ["Bearer s3cret", None, "Bearer s3cret"]
    assert isinstance(gateway.credentials.cache, MemoryTokenCache)
    lookups = gateway.credentials.cache.lookups
    assert (lookups[("a2a:keyed", "miss")], lookups[("a2a:keyed", "hit")]) == (1, 1), (
        "the secret came from the credentials stage, read once"
    )
    assert [c.credential_mode for c, _ in gateway.calls.seen] == ["static", "none", "static"]


async def test_a_static_credential_can_travel_in_the_header_the_agent_names(gateway: Gateway) -> None:
    answer = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"message": {"messageId": "m", "parts": []}}})
    gateway.scripts.append(Answer(chunks=[answer], headers={"content-type": "application/json"}))
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {**MESSAGE}}
    body["params"]["metadata"] = {SKILL_KEY: "s"}
    sent = await gateway.http("alice").post("/a2a/apikey", json=body, headers={"a2a-version": "1.0"})
    assert sent.status_code == 200 and "result" in sent.json(), sent.text
    headers = gateway.scripted_requests[0].headers
    assert headers["x-api-key"] == "s3cret", "the bare secret, as the agent's declaration says"
    assert "authorization" not in headers, "never the caller's token"


def events(*payloads: Any, name: str | None = None) -> list[bytes]:
    prefix = f"event: {name}\n".encode() if name else b""
    return [prefix + b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads]


def rpc_event(result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result}


WORKING = {"statusUpdate": {"taskId": "s1", "contextId": "c", "status": {"state": "TASK_STATE_WORKING"}}}
DONE = {"statusUpdate": {"taskId": "s1", "contextId": "c", "status": {"state": "TASK_STATE_COMPLETED"}}}
STREAM_BODY = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "SendStreamingMessage",
    "params": {**MESSAGE, "metadata": {SKILL_KEY: "s"}},
}


def sse_data(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        name = "message"
        data = ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        out.append((name, orjson.loads(data)))
    return out


async def test_a_stream_is_relayed_event_by_event_and_its_tasks_become_the_callers(gateway: Gateway) -> None:
    # One event split across chunks, CRLF line ends: the relay must reassemble, not forward bytes blindly.
    first, second = events(rpc_event(WORKING), rpc_event(DONE))
    gateway.scripts.append(sse_answer([first[:10], first[10:], second.replace(b"\n", b"\r\n")], "end"))
    response = await gateway.http("alice").post(
        "/a2a/scripted", json=STREAM_BODY, headers={"a2a-version": "1.0"}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [d["result"] for _, d in sse_data(response.text)] == [WORKING, DONE]
    assert await gateway.ingress._owners.owner("scripted", "s1") == "user:alice"
    assert gateway.settles.statuses == ["ok"]
    assert gateway.calls.seen[0][0].session_id == "s1"
    sent = gateway.scripted_requests[0]
    assert sent.headers["accept"].startswith("text/event-stream") and sent.content == orjson.dumps(
        STREAM_BODY
    )


async def test_an_agent_that_drops_the_stream_midway_ends_it_with_an_error_and_is_closed(
    gateway: Gateway,
) -> None:
    script = sse_answer(events(rpc_event(WORKING)), "drop")
    gateway.scripts.append(script)
    response = await gateway.http("alice").post(
        "/a2a/scripted", json=STREAM_BODY, headers={"a2a-version": "1.0"}
    )
    received = sse_data(response.text)
    assert received[0] == ("message", rpc_event(WORKING))
    assert received[1][0] == "error"
    assert received[1][1]["error"]["message"] == "A2A agent 'scripted' broke off the stream"
    assert received[1][1]["id"] == 1
    assert script.closed.is_set()
    assert gateway.settles.statuses == ["upstream_dropped"]


async def test_a_stream_that_ends_before_a_final_event_ends_with_an_error(gateway: Gateway) -> None:
    rest_working = WORKING
    gateway.scripts.append(sse_answer(events(rest_working), "end"))
    response = await gateway.http("alice").post(
        "/a2a/scripted/message:stream", json=STREAM_BODY["params"], headers={"a2a-version": "1.0"}
    )
    received = sse_data(response.text)
    assert received[0] == ("message", WORKING)
    assert received[1][0] == "error"
    assert received[1][1]["error"]["details"][0]["reason"] == "INVALID_AGENT_RESPONSE"
    assert gateway.settles.statuses == ["upstream_incomplete"]


async def test_an_agent_whose_stream_breaks_before_its_first_event_is_an_error_answer(
    gateway: Gateway,
) -> None:
    script = sse_answer([], "drop")
    gateway.scripts.append(script)
    response = await gateway.http("alice").post(
        "/a2a/scripted", json=STREAM_BODY, headers={"a2a-version": "1.0"}
    )
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] == "A2A agent 'scripted' broke off the stream"
    assert script.closed.is_set()
    assert gateway.calls.seen[0][1] == "upstream_error"


async def test_a_stream_naming_another_callers_task_is_cut(gateway: Gateway) -> None:
    await gateway.ingress._owners.claim("scripted", "s1", "user:bob")
    script = sse_answer(
        events(
            rpc_event({"task": {"id": "mine", "status": {"state": "TASK_STATE_WORKING"}}}), rpc_event(DONE)
        ),
        "end",
    )
    gateway.scripts.append(script)
    response = await gateway.http("alice").post(
        "/a2a/scripted", json=STREAM_BODY, headers={"a2a-version": "1.0"}
    )
    received = sse_data(response.text)
    assert [name for name, _ in received] == ["message", "error"]
    assert "another caller" in received[1][1]["error"]["message"]
    assert script.closed.is_set()


async def test_a_caller_that_goes_away_closes_the_agents_stream_and_settles_once(gateway: Gateway) -> None:
    script = sse_answer(events(rpc_event(WORKING)), "hang")
    gateway.scripts.append(script)
    body = orjson.dumps(STREAM_BODY)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/a2a/scripted",
        "raw_path": b"/a2a/scripted",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"a2a-version", b"1.0"),
            (b"authorization", b"Bearer alice"),
            (b"host", b"gw.test"),
        ],
        "server": ("gw.test", 80),
        "client": ("127.0.0.1", 1),
        "path_params": {"agent": "scripted"},
    }
    delivered = False
    first_event_sent = anyio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_event_sent.wait()  # the agent is silent now, and the caller hangs up
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send_message(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            first_event_sent.set()

    response = await gateway.ingress.jsonrpc(Request(scope, receive))
    with anyio.fail_after(5):
        await response(scope, receive, send_message)
        await script.closed.wait()
        await gateway.settles.done.wait()
    assert b"TASK_STATE_WORKING" in sent[1]["body"]
    assert gateway.settles.statuses == ["client_gone"]


async def test_a_stage_refusing_after_the_agent_answered_closes_the_stream(gateway: Gateway) -> None:
    script = sse_answer(events(rpc_event(WORKING)), "hang")
    gateway.scripts.append(script)

    async def refuse_on_the_way_back(call: Call, call_next: CallNext) -> Reply:
        await call_next(call)
        raise Forbidden("denied by policy: changed its mind")

    pipeline = gateway.ingress._pipeline
    gateway.ingress._pipeline = ordered(
        refuse_on_the_way_back,
        *pipeline.filters[1:],  # type: ignore[arg-type]  # five stages, as ordered() wants
    )
    response = await gateway.http("alice").post(
        "/a2a/scripted", json=STREAM_BODY, headers={"a2a-version": "1.0"}
    )
    assert response.json()["error"]["code"] == -32043
    with anyio.fail_after(5):
        await script.closed.wait()


@pytest.mark.parametrize(
    ("method", "path", "version", "body"),
    [
        ("GET", "/a2a/echo/extendedAgentCard", "1.0", None),
        ("GET", "/a2a/echo/v1/card", "0.3", None),
        (
            "POST",
            "/a2a/echo",
            "0.3",
            {"jsonrpc": "2.0", "id": 5, "method": "agent/getAuthenticatedExtendedCard"},
        ),
    ],
)
async def test_the_extended_card_is_filtered_over_every_binding_and_generation(
    gateway: Gateway, method: str, path: str, version: str, body: dict[str, Any] | None
) -> None:
    answer = await gateway.http("bob").request(method, path, json=body, headers={"a2a-version": version})
    assert answer.status_code == 200, answer.text
    card = answer.json()["result"] if body else answer.json()
    assert [s["id"] for s in card["skills"]] == ["echo"]
    urls = {i["url"] for i in card.get("supportedInterfaces", [])} | {card.get("url", f"{GW}/a2a/echo")}
    assert urls == {f"{GW}/a2a/echo"}


async def test_an_agents_own_a2a_errors_reach_the_caller_unchanged(gateway: Gateway) -> None:
    http = gateway.http("alice")
    created = await http.post(
        "/a2a/echo/message:send", json={**MESSAGE, **SKILLED}, headers={"a2a-version": "1.0"}
    )
    task_id = created.json()["task"]["id"]
    push = {"taskId": task_id, "url": "https://hooks.example/x"}
    rpc_body = {"jsonrpc": "2.0", "id": 9, "method": "CreateTaskPushNotificationConfig", "params": push}
    answer = await http.post("/a2a/echo", json=rpc_body, headers={"a2a-version": "1.0"})
    assert answer.json()["id"] == 9
    assert answer.json()["error"]["code"] == -32003, "PushNotificationNotSupported, from the agent"
    rest = await http.post(
        f"/a2a/echo/tasks/{task_id}/pushNotificationConfigs", json=push, headers={"a2a-version": "1.0"}
    )
    assert rest.status_code == 400
    assert rest.json()["error"]["details"][0]["reason"] == "PUSH_NOTIFICATION_NOT_SUPPORTED"
    outcomes = [reason for call, reason in gateway.calls.seen if call.resource == "a2a:echo/task/push-config"]
    assert outcomes == ["upstream_error", "upstream_400"]


async def test_without_credentials_every_route_but_the_card_answers_401_with_the_oauth_challenge(
    gateway: Gateway,
) -> None:
    stages = gateway.ingress._pipeline.filters
    strict = Authenticate(Names(), allow_anonymous=False, base_url=GW)
    gateway.ingress._pipeline = ordered(stages[0], strict, *stages[2:])  # type: ignore[arg-type]  # a star tuple: five stages, as ordered() wants
    gateway.ingress._security = CardSecurity.bearer(required=True)  # as built for allow_anonymous=False
    http = gateway.http(None)
    body = {"jsonrpc": "2.0", "id": 2, "method": "GetTask", "params": {"id": "t"}}
    answers = [
        await http.post("/a2a/echo", json=body, headers={"a2a-version": "1.0"}),
        await http.get("/a2a/echo/tasks/t", headers={"a2a-version": "1.0"}),
    ]
    for answer in answers:
        assert answer.status_code == 401
        challenge = answer.headers["www-authenticate"]
        assert (
            challenge.startswith("Bearer ") and "/.well-known/oauth-protected-resource/a2a/echo" in challenge
        )
    assert answers[0].json()["error"]["code"] == -32041
    assert answers[1].json()["error"]["status"] == "UNAUTHENTICATED"
    # The public card is served to anyone: it is how a client learns to authenticate. It requires the
    # gateway's bearer token and lists only the skills the policy gives `anonymous`.
    card = await http.get("/a2a/echo/.well-known/agent-card.json")
    assert card.status_code == 200
    document = card.json()
    assert document["securityRequirements"] == [{"schemes": {"agentgw": {"list": []}}}]
    assert "httpAuthSecurityScheme" in document["securitySchemes"]["agentgw"]
    assert [s["id"] for s in document["skills"]] == ["echo"]
    assert gateway.echo.received == []


async def test_an_agents_server_error_becomes_the_gateways_own_error_never_relayed(gateway: Gateway) -> None:
    leak = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "db at 10.0.0.7 refused"}}
    gateway.scripts.append(Answer(500, [orjson.dumps(leak)], {"content-type": "application/json"}))
    gateway.scripts.append(
        Answer(500, [b'{"error": "db at 10.0.0.7"}'], {"content-type": "application/json"})
    )
    http = gateway.http("alice")
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {**MESSAGE, "metadata": {SKILL_KEY: "s"}},
    }
    rpc = await http.post("/a2a/scripted", json=body, headers={"a2a-version": "1.0"})
    assert rpc.status_code == 200, "A2A's JSON-RPC clients read errors at 200 only"
    assert rpc.json()["id"] == 1
    assert rpc.json()["error"]["code"] == -32603
    assert rpc.json()["error"]["message"] == "A2A agent 'scripted' failed (HTTP 500)"
    rest = await http.post(
        "/a2a/scripted/message:send",
        json={**MESSAGE, "metadata": {SKILL_KEY: "s"}},
        headers={"a2a-version": "1.0"},
    )
    assert rest.status_code == 502
    assert rest.json()["error"]["message"] == "A2A agent 'scripted' failed (HTTP 500)"
    assert "10.0.0.7" not in rpc.text + rest.text
    assert [reason for call, reason in gateway.calls.seen if call.upstream == "scripted"] == [
        "upstream_failed"
    ] * 2
