"""Two agents that call each other through the gateway forever, stopped by a run budget.

`ping` answers a message by asking `pong` through the gateway in the same context, and `pong` asks
`ping`: without the gateway's iteration budget the pair would loop until the fixture's own hop limit.
Every message of the loop is a `send` in the run named by its context id, so a budget of N calls per
run admits exactly N messages and refuses the next one with a clear budget error, which travels back
up the chain of waiting agents to the caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.helpers import get_message_text
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, Task, TaskState
from sqlalchemy import Engine

from agentgw.storage import make_engine
from agentgw.storage.audit import AuditQuery
from conformance.fixtures.a2a_agents import agents_args
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.audit import records_until
from tests.support.gateway import RunningGateway, run_gateway

MESSAGES_PER_CONTEXT = 6


@dataclass
class Loop:
    gateway: RunningGateway
    agents: FixtureProcess
    engine: Engine


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    port = free_port()
    agents = f"http://127.0.0.1:{port}"
    config = {
        "allow_anonymous": True,
        "a2a_agents": [
            {"name": name, "card_url": f"{agents}/{name}/.well-known/agent-card.json", "timeout_s": 60}
            for name in ("ping", "pong")
        ],
        "policy": {"rules": ["p, anonymous, a2a:*, *"]},
        "budgets": {
            "rules": [
                {"name": "a2a-turns", "per": "run", "resource": "a2a:*", "calls": MESSAGES_PER_CONTEXT},
            ]
        },
    }
    # The agents learn the gateway's URL at start; the gateway fetches their cards on first use.
    with (
        run_gateway(tmp_path_factory.mktemp("pingpong"), config) as gateway,
        start_process(agents_args(["ping", "pong"], port, gateway=gateway.url), port) as process,
    ):
        engine = make_engine(gateway.database_url)
        try:
            yield Loop(gateway, process, engine)
        finally:
            engine.dispose()


async def test_a_ping_pong_loop_is_stopped_by_its_iteration_budget(loop: Loop) -> None:
    context = uuid.uuid4().hex
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER, message_id=uuid.uuid4().hex, context_id=context, parts=[Part(text="go")]
        )
    )
    request.metadata.update({"skill": "pingpong", "hops": 0})
    async with httpx.AsyncClient(timeout=120) as http:
        config = ClientConfig(httpx_client=http, streaming=False)
        async with await create_client(f"{loop.gateway.url}/a2a/ping", client_config=config) as client:
            task: Task | None = None
            with anyio.fail_after(120):
                async for event in client.send_message(request):
                    task = event.task
    assert task is not None
    text = get_message_text(task.status.message)
    assert task.status.state == TaskState.TASK_STATE_FAILED, text
    assert "hop limit" not in text, "the fixture's own safety stop ran: the budget never did"
    assert "budget 'a2a-turns' exhausted" in text
    assert f"peer refused at hop {MESSAGES_PER_CONTEXT}" in text, text

    records = await records_until(
        loop.engine,
        AuditQuery(protocol="a2a", run_id=context, event="decision"),
        lambda found: sum(r["action"] == "send" for r in found) > MESSAGES_PER_CONTEXT,
    )
    sends = [(r["upstream"], r["decision"]) for r in records if r["action"] == "send"]
    assert len(sends) == MESSAGES_PER_CONTEXT + 1
    assert all(decision == "allowed" for _, decision in sends[:-1])
    assert sends[-1][1] == "denied", "the refused message is in the audit log too"
    assert [upstream for upstream, _ in sends[:4]] == ["ping", "pong", "ping", "pong"]
    refused = next(r for r in records if r["decision"] == "denied")
    assert refused["reason"] == "budget_exceeded"
