"""a2a-sdk clients through a real gateway process to the a2a-sdk fixture agents on 127.0.0.1.

Unary and streaming messages, task get/list/cancel/subscribe, over JSON-RPC and HTTP+JSON, as 1.0 and
0.3 clients; two principals (API keys for `user:alice` and `user:bob`) with different skills, task
isolation between them, a denied skill that never reaches the agent; and the bad cases: invalid
JSON-RPC, unknown methods and agents, a card that cannot be fetched, an agent that drops its stream.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import A2AError, TaskNotFoundError
from sqlalchemy import Engine

from agentgw.oauth.apikeys import ApiKeyStore, NewApiKey
from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import free_port, start_process
from tests.support.audit import keys, records_until
from tests.support.gateway import RunningGateway, run_gateway

AGENTS = ("echo", "stream", "slow", "dropper")
POLICY = [
    "p, anonymous, a2a:*, *",
    "p, user:alice, a2a:echo/*, *",
    "p, user:bob, a2a:echo/echo, *",
    "p, user:bob, a2a:echo/task/*, call",
]
BINDINGS = [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0"), ("JSONRPC", "0.3"), ("HTTP+JSON", "0.3")]
TIMEOUT = 20


@dataclass
class Stack:
    gateway: RunningGateway
    agents: str
    keys: dict[str, str]
    engine: Engine

    def agent(self, name: str) -> str:
        return f"{self.gateway.url}/a2a/{name}"

    def received(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.agents}/_fixture/received").json()
        return records

    def headers(self, user: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[user]}"} if user else {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    agents = f"http://127.0.0.1:{port}"
    config = {
        "allow_anonymous": True,
        "a2a_agents": [
            *({"name": k, "card_url": f"{agents}/{k}/.well-known/agent-card.json"} for k in AGENTS),
            {"name": "broken", "card_url": f"{agents}/_fixture/card-500"},
        ],
        "policy": {"rules": POLICY},
    }
    tmp: Path = tmp_path_factory.mktemp("a2a")
    # The gateway fetches cards on first use, so it may start before the agents.
    with run_gateway(tmp, config) as gateway, start_process(agents_args(AGENTS, port), port):
        # Two principals: API keys, written to the gateway's database as `agentgw` itself would.
        engine = make_engine(gateway.database_url)
        try:
            store = ApiKeyStore(engine)
            keys = {user: store.create(NewApiKey(subject=f"user:{user}")).key for user in ("alice", "bob")}
            yield Stack(gateway, agents, keys, engine)
        finally:
            engine.dispose()


@asynccontextmanager
async def a2a_client(
    stack: Stack,
    agent: str,
    binding: str = "JSONRPC",
    version: str = "1.0",
    *,
    user: str | None = None,
    streaming: bool = True,
) -> AsyncIterator[Client]:
    """An a2a-sdk client resolved from the gateway's card, keeping only `version` interfaces (so a
    "0.3 client" is the SDK's 0.3 transport, sending 0.3 method names and paths)."""
    async with httpx.AsyncClient(headers=stack.headers(user), timeout=TIMEOUT) as http:
        card = await A2ACardResolver(http, stack.agent(agent)).get_agent_card()
        narrowed = AgentCard()
        narrowed.CopyFrom(card)
        del narrowed.supported_interfaces[:]
        narrowed.supported_interfaces.extend(
            i for i in card.supported_interfaces if i.protocol_version == version
        )
        config = ClientConfig(httpx_client=http, streaming=streaming, supported_protocol_bindings=[binding])
        async with ClientFactory(config).create(narrowed) as client:
            yield client


def hello(skill: str, text: str = "hi", **message: Any) -> SendMessageRequest:
    request = SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=text)], **message)
    )
    request.metadata.update({"skill": skill})
    return request


async def first_task(client: Client, request: SendMessageRequest) -> Task:
    with anyio.fail_after(TIMEOUT):
        async for event in client.send_message(request):
            if event.HasField("task"):
                task: Task = event.task
                return task
    raise AssertionError("the answer named no task")


def state_of(event: StreamResponse) -> int | None:
    if event.HasField("task"):
        return int(event.task.status.state)
    if event.HasField("status_update"):
        return int(event.status_update.status.state)
    return None


# --- through the gateway ---------------------------------------------------------------------------


async def test_the_gateways_card_points_every_interface_at_the_gateway(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        card = (await http.get(f"{stack.agent('echo')}/.well-known/agent-card.json")).json()
    urls = {i["url"] for i in card["supportedInterfaces"]} | {card["url"]}
    assert urls == {stack.agent("echo")}
    assert {(i["protocolBinding"], i["protocolVersion"]) for i in card["supportedInterfaces"]} == {
        ("JSONRPC", "1.0"),
        ("HTTP+JSON", "1.0"),
        ("JSONRPC", "0.3"),
        ("HTTP+JSON", "0.3"),
    }
    assert list(card["securitySchemes"]) == ["agentgw"]


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_unary_message_makes_a_task_that_can_be_read_and_listed(
    stack: Stack, binding: str, version: str
) -> None:
    async with a2a_client(stack, "echo", binding, version, streaming=False) as client:
        task = await first_task(client, hello("shout", "hello"))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert task.artifacts[0].parts[0].text == "HELLO"
        assert (await client.get_task(GetTaskRequest(id=task.id))).id == task.id
        if version == "1.0":  # 0.3 has no ListTasks
            listed = await client.list_tasks(ListTasksRequest(context_id=task.context_id))
            assert [t.id for t in listed.tasks] == [task.id]


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_streamed_message_arrives_event_by_event(stack: Stack, binding: str, version: str) -> None:
    async with a2a_client(stack, "stream", binding, version) as client:
        chunks: list[str] = []
        states: list[int] = []
        with anyio.fail_after(TIMEOUT):
            async for event in client.send_message(hello("count")):
                if event.HasField("artifact_update"):
                    chunks += [p.text for p in event.artifact_update.artifact.parts]
                if (state := state_of(event)) is not None:
                    states.append(state)
    assert chunks == ["chunk 0", "chunk 1", "chunk 2"]
    assert states[0] == TaskState.TASK_STATE_SUBMITTED and states[-1] == TaskState.TASK_STATE_COMPLETED


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_long_running_task_streams_while_it_runs_and_can_be_cancelled_and_subscribed(
    stack: Stack, binding: str, version: str
) -> None:
    async with (
        a2a_client(stack, "slow", binding, version) as client,
        a2a_client(stack, "slow", binding, version) as other,
    ):
        stream = client.send_message(hello("wait"))
        with anyio.fail_after(TIMEOUT):
            first = await anext(stream)
            # The task still runs (until cancelled): the gateway relays events as they arrive.
            working = await anext(stream)
        task_id = first.task.id
        assert state_of(working) == TaskState.TASK_STATE_WORKING
        subscription = other.subscribe(SubscribeToTaskRequest(id=task_id))
        with anyio.fail_after(TIMEOUT):
            snapshot = await anext(subscription)
            assert state_of(snapshot) == TaskState.TASK_STATE_WORKING
            cancelled = await other.cancel_task(CancelTaskRequest(id=task_id))
            assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
            rest = [state_of(e) async for e in stream]
            subscribed = [state_of(e) async for e in subscription]
    assert rest[-1] == TaskState.TASK_STATE_CANCELED
    assert subscribed[-1] == TaskState.TASK_STATE_CANCELED


# --- two principals ---------------------------------------------------------------------------------


async def test_two_principals_see_different_skills_in_the_same_agents_card(stack: Stack) -> None:
    skills = {}
    async with httpx.AsyncClient() as http:
        for user in ("alice", "bob"):
            card = await http.get(
                f"{stack.agent('echo')}/.well-known/agent-card.json", headers=stack.headers(user)
            )
            skills[user] = [s["id"] for s in card.json()["skills"]]
    assert skills == {"alice": ["echo", "shout"], "bob": ["echo"]}


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "0.3")])
async def test_a_denied_skill_is_refused_before_the_agent(stack: Stack, binding: str, version: str) -> None:
    denied, allowed = hello("shout"), hello("echo")
    async with a2a_client(stack, "echo", binding, version, user="bob", streaming=False) as client:
        with pytest.raises(A2AError):
            await first_task(client, denied)
        await first_task(client, allowed)
    seen = {r.get("message_id"): r for r in stack.received()}
    assert denied.message.message_id not in seen
    assert seen[allowed.message.message_id]["authorization"] is None, "the caller's key never goes upstream"


@pytest.mark.parametrize(("binding", "version"), BINDINGS)
async def test_a_task_created_by_one_principal_is_invisible_to_another(
    stack: Stack, binding: str, version: str
) -> None:
    async with (
        a2a_client(stack, "echo", binding, version, user="alice", streaming=False) as alice,
        a2a_client(stack, "echo", binding, version, user="bob", streaming=False) as bob,
    ):
        task = await first_task(alice, hello("echo"))
        with pytest.raises(TaskNotFoundError):
            await bob.get_task(GetTaskRequest(id=task.id))
        with pytest.raises(TaskNotFoundError):
            await bob.cancel_task(CancelTaskRequest(id=task.id))
        with pytest.raises(TaskNotFoundError):
            await first_task(bob, hello("echo", task_id=task.id))
        if version == "1.0":
            assert task.id not in [t.id for t in (await bob.list_tasks(ListTasksRequest())).tasks]
        assert (await alice.get_task(GetTaskRequest(id=task.id))).id == task.id


async def test_every_step_is_in_the_audit_log_with_its_context_and_task(stack: Stack) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(stack, "echo", user="alice", streaming=False) as client:
        task = await first_task(client, hello("echo", context_id=context))
        await client.get_task(GetTaskRequest(id=task.id))
    async with a2a_client(stack, "echo", user="bob", streaming=False) as bob:
        with pytest.raises(A2AError):
            await first_task(bob, hello("shout", context_id=context))
    # Records are durable in the journal before the answer is sent and reach SQL a moment later
    # (decision 0210), so this other process reads until the three it expects are there.
    expected = {
        ("user:alice", "a2a:echo/echo", "decision", "allowed"),
        ("user:alice", "a2a:echo/echo", "outcome", "allowed"),
        ("user:bob", "a2a:echo/shout", "decision", "denied"),
    }
    records = await records_until(
        stack.engine, AuditQuery(protocol="a2a", run_id=context), lambda found: expected <= keys(found)
    )
    outcome = next(r for r in records if r["event"] == "outcome")
    assert outcome["session_id"] == task.id, "the task id is recorded with the context id"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{", -32700),
        (b"[]", -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tasks/explode", "params": {}}', -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": 5}}', -32602),
    ],
)
async def test_invalid_jsonrpc_gets_a_clear_a2a_error(stack: Stack, content: bytes, code: int) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            stack.agent("echo"),
            content=content,
            headers={"content-type": "application/json", "a2a-version": "1.0"},
        )
    assert answer.status_code == 200
    assert answer.json()["error"]["code"] == code


async def test_an_unknown_agent_is_a_clear_404(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            stack.agent("nobody"),
            json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "t"}},
        )
        card = await http.get(f"{stack.agent('nobody')}/.well-known/agent-card.json")
    assert answer.status_code == 404 and "unknown A2A agent 'nobody'" in answer.json()["error"]["message"]
    assert card.status_code == 404


async def test_a_card_that_cannot_be_fetched_is_a_clear_error(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        card = await http.get(f"{stack.agent('broken')}/.well-known/agent-card.json")
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"messageId": "m"}}}
        body["params"]["metadata"] = {"skill": "any"}
        answer = await http.post(stack.agent("broken"), json=body, headers={"a2a-version": "1.0"})
    assert card.status_code == 502
    assert "the agent card of 'broken' could not be fetched" in card.json()["error"]["message"]
    assert "could not be fetched" in answer.json()["error"]["message"]


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0")])
async def test_an_agent_that_drops_its_stream_midway_ends_it_with_an_error(
    stack: Stack, binding: str, version: str
) -> None:
    async with a2a_client(stack, "dropper", binding, version) as client:
        events = []
        with anyio.fail_after(TIMEOUT), pytest.raises((A2AClientError, A2AError)) as info:
            async for event in client.send_message(hello("drop")):
                events.append(event)
    assert len(events) == 1 and state_of(events[0]) == TaskState.TASK_STATE_WORKING
    assert "broke off the stream" in str(info.value)
    # Nothing is left half-open: the gateway answers the next call at once.
    async with a2a_client(stack, "echo", streaming=False) as client:
        assert (await first_task(client, hello("echo"))).status.state == TaskState.TASK_STATE_COMPLETED


async def test_a_dropped_stream_ends_with_an_error_event_and_a_closed_response(stack: Stack) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": "r1",
        "method": "SendStreamingMessage",
        "params": {
            "message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}]},
            "metadata": {"skill": "drop"},
        },
    }
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.post(stack.agent("dropper"), json=body, headers={"a2a-version": "1.0"})
    assert answer.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in answer.text.split("\n\n") if b.strip()]
    assert len(blocks) == 2
    assert blocks[1].startswith("event: error")
    assert '"id":"r1"' in blocks[1] and "broke off the stream" in blocks[1]
