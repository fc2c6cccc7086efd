"""The A2A TCK's reference agent (python-sut/tck_core_agent in the kit), ported to a2a-sdk 1.x.

    python -m conformance.a2a.tck_agent --port P [--base-url URL]

The kit at the pinned commit speaks A2A 1.0, but its reference agent is written for the a2a-sdk 0.3
API. This is the same agent on the 1.x server API: the same card (one skill, streaming, the same
security schemes declared and not enforced), the same task lifecycle and delays (submitted, 0.5 s,
working, 0.5 s, the answer as an artifact, completed), the same replies, cancellation, and the hold
that the kit's docs/SUT_REQUIREMENTS.md asks for: a task whose message id starts with
`test-resubscribe-message-id` stays working for 2 x TCK_STREAMING_TIMEOUT seconds. It is served at
the root, JSON-RPC at `/` and HTTP+JSON beside it, as the kit expects of a direct SUT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    AuthorizationCodeOAuthFlow,
    HTTPAuthSecurityScheme,
    OAuth2SecurityScheme,
    OAuthFlows,
    Part,
    SecurityRequirement,
    SecurityScheme,
    StringList,
    Task,
    TaskState,
    TaskStatus,
)
from starlette.applications import Starlette

HOST = "127.0.0.1"
RESUBSCRIBE_PREFIX = "test-resubscribe-message-id"


def answer(query: str) -> str:
    """The reference agent's replies, word for word."""
    if not query.strip():
        return "Hello! Please provide a message for me to respond to."
    lower = query.lower()
    if "hello" in lower or "hi" in lower:
        return "Hello World! Nice to meet you!"
    if "how are you" in lower:
        return "I'm doing great! Thanks for asking. How can I help you today?"
    if "goodbye" in lower or "bye" in lower:
        return "Goodbye! Have a wonderful day!"
    return f"Hello World! You said: '{query}'. Thanks for your message!"


def agent_card(url: str) -> AgentCard:
    schemes = {
        "bearerAuth": SecurityScheme(
            http_auth_security_scheme=HTTPAuthSecurityScheme(
                scheme="bearer", description="HTTP Bearer token authentication"
            )
        ),
        "oauth2": SecurityScheme(
            oauth2_security_scheme=OAuth2SecurityScheme(
                description="OAuth 2.0 authentication",
                flows=OAuthFlows(
                    authorization_code=AuthorizationCodeOAuthFlow(
                        authorization_url="https://auth.example.com/oauth/authorize",
                        token_url="https://auth.example.com/oauth/token",
                        scopes={"read": "Read access", "write": "Write access"},
                    )
                ),
            )
        ),
    }
    return AgentCard(
        name="TCK Core Agent",
        description=(
            "A complete A2A agent implementation designed specifically for testing with the A2A "
            "Technology Compatibility Kit (TCK)"
        ),
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding=binding, protocol_version="1.0")
            for binding in ("JSONRPC", "HTTP+JSON")
        ],
        default_input_modes=["text"],
        default_output_modes=["text"],
        skills=[
            AgentSkill(
                id="tck_core_agent",
                name="TCK Core Agent",
                description="A complete A2A agent implementation designed for TCK testing",
                examples=["hi", "hello world", "how are you", "goodbye"],
                tags=["tck", "testing", "core", "complete"],
            )
        ],
        capabilities=AgentCapabilities(streaming=True),
        security_schemes=schemes,
        security_requirements=[
            SecurityRequirement(schemes={"bearerAuth": StringList()}),
            SecurityRequirement(schemes={"oauth2": StringList(list=["read", "write"])}),
        ],
    )


class TckCoreAgentExecutor(AgentExecutor):
    def __init__(self) -> None:
        self._running: set[str] = set()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        task = context.current_task
        if task is None:
            await event_queue.enqueue_event(
                Task(
                    id=context.task_id,
                    context_id=context.context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                    history=[context.message] if context.message is not None else [],
                )
            )
        elif task.status.state in (TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_CANCELED):
            return
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        self._running.add(context.task_id)
        try:
            await asyncio.sleep(0.5)
            if context.task_id not in self._running:
                return
            await updater.start_work()
            message_id = context.message.message_id if context.message is not None else ""
            hold = 0.5
            if message_id.startswith(RESUBSCRIBE_PREFIX):
                hold = 2 * float(os.environ.get("TCK_STREAMING_TIMEOUT", "2.0"))
            await asyncio.sleep(hold)
            if context.task_id not in self._running:
                return
            result = answer(context.get_user_input())
            await asyncio.sleep(0.2)
            if context.task_id not in self._running:
                return
            await updater.add_artifact([Part(text=result)], name="response", metadata=None, last_chunk=True)
            await updater.complete(updater.new_agent_message([Part(text=result)]))
        except Exception as exc:  # the reference agent reports any failure as a failed task
            await updater.failed(updater.new_agent_message([Part(text=f"Error processing request: {exc}")]))
        finally:
            self._running.discard(context.task_id)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        self._running.discard(context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def build_app(base_url: str) -> Starlette:
    card = agent_card(base_url.rstrip("/") + "/")
    handler = DefaultRequestHandler(
        agent_executor=TckCoreAgentExecutor(), task_store=InMemoryTaskStore(), agent_card=card
    )
    routes = [
        *create_agent_card_routes(card),
        *create_jsonrpc_routes(handler, rpc_url="/"),
        *create_rest_routes(handler),
    ]
    return Starlette(routes=routes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", help="the URL the card names (default http://127.0.0.1:PORT)")
    args = parser.parse_args(argv)
    base = args.base_url or f"http://{HOST}:{args.port}"
    uvicorn.run(build_app(base), host=HOST, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
