"""A2A agents behind the gateway: `/a2a/<agent>`, JSON-RPC and HTTP+JSON, A2A 1.0 and 0.3.

Routes (the agent's gateway URL is `<base>/a2a/<agent>`; the rewritten card lists it for both bindings):
    GET  /a2a/<agent>/.well-known/agent-card.json   the agent's card, rewritten for the caller
    POST /a2a/<agent>                               JSON-RPC (1.0 `SendMessage`..., 0.3 `message/send`...)
    *    /a2a/<agent>/<path>                        HTTP+JSON: 1.0 paths (`message:send`, `tasks/{id}`,
                                                    optionally after a tenant segment), 0.3 under `v1/`

Every request is one `Call(protocol="a2a")` through the one pipeline:
    card, GetExtendedAgentCard   action `list` on `a2a:<agent>`; `Reply.listing` names every skill as
                                 `a2a:<agent>/<skill>`, the policy stage narrows it, and the card the
                                 caller gets lists only the skills still named.
    SendMessage (+ streaming)    action `send` on `a2a:<agent>/<skill>`.
    task reads and control       action `call` on `a2a:<agent>/task/<op>`, op one of `get`, `list`,
                                 `cancel`, `subscribe`, `push-config`. Skill ids are percent-encoded
                                 outside `[A-Za-z0-9_.~-]`, so no skill can be named `task/...`.
The skill of a message is `metadata.skill` of the request or of the message (they must agree), else
the agent's configured `default_skill` (then written into the forwarded request's metadata, so the
agent runs the skill policy allowed); a message with neither is refused (-32602) before the pipeline,
and one whose skill policy does not allow is refused by it: neither reaches the agent.
`Call.run_id` is the `Agent-Run-Id` header, else the message's `contextId`, so budgets per run count
an agent-to-agent conversation; `Call.session_id` is the task id (from the request, or the first
task the agent's answer names), so audit records carry both. `Call.endpoint` is `/a2a/<agent>`.

The gateway keeps task ownership: a task the agent creates for a caller belongs to that caller's
subject, and reading, listing, cancelling, subscribing to, configuring pushes for, continuing or
referencing a task that is not the caller's own is `TaskNotFound`, exactly as for a task that does
not exist (both JSON spellings of a field are read: agents parse protobuf JSON, which takes `taskId`
and `task_id` alike). `ListTasks` answers keep only the caller's tasks. Context ids are not owned:
agents pass them along a chain of calls on purpose (that is what per-context budgets count).

Versions: `A2A-Version` 1.x is 1.0, 0.3.x or no header is 0.3, anything else is -32009. Requests go
to the agent's interface of the same binding and generation (the method names and paths say which):
bodies are forwarded as bytes, answers relayed as they arrive, SSE event by event. Decisions are
written up in docs/decisions/0400-0402.

Errors keep A2A's codes (TaskNotFound -32001 ... VersionNotSupported -32009). The gateway's own
refusals use codes that cannot be mistaken for them: denied by policy -32043, unauthenticated
-32041 (with HTTP 401/403 and the OAuth challenge), budget -32029. Over JSON-RPC, errors are HTTP 200
except those the transport must see (401, 403 for scope, 404 unknown agent, 413, 415); over
HTTP+JSON, they are the HTTP status with a `google.rpc.Status` body. A stream that the agent breaks
off, or ends before the task reaches a final or interrupted state, ends with an `error` event.

The package, one concept per module, each importing only those above it:
    errors      A2A's errors, and the gateway's errors in A2A's shapes
    messages    reading a request: operation, task ids, skill, policy objects
    tasks       what answers say about tasks, and who owns each task
    cards       the card a caller gets (pure rewriting)
    signatures  card signatures: upstream cards verified, served cards signed
    relay       an agent's SSE answer relayed to the caller
    ingress     the routes, the pipeline call, the terminal that forwards to the agent
The wire to the agent (headers, the request, reading its SSE stream) is `agentgw.upstream.a2a`.
"""

from agentgw.ingress.a2a.cards import CardSecurity, rewrite_card
from agentgw.ingress.a2a.errors import (
    AgentNotFound,
    InvalidAgentResponse,
    InvalidParams,
    MethodNotFound,
    TaskNotFound,
    UnsupportedOperation,
    VersionNotSupported,
    jsonrpc_error,
    rest_error,
)
from agentgw.ingress.a2a.ingress import A2aIngress
from agentgw.ingress.a2a.messages import (
    SKILL_KEY,
    A2aRequest,
    parse_jsonrpc,
    parse_rest,
    requested_version,
    skill_object,
    task_object,
)
from agentgw.ingress.a2a.tasks import MemoryTaskOwners, TaskOwners, answer_task_ids, is_final

__all__ = [
    "SKILL_KEY",
    "A2aIngress",
    "A2aRequest",
    "AgentNotFound",
    "CardSecurity",
    "InvalidAgentResponse",
    "InvalidParams",
    "MemoryTaskOwners",
    "MethodNotFound",
    "TaskNotFound",
    "TaskOwners",
    "UnsupportedOperation",
    "VersionNotSupported",
    "answer_task_ids",
    "is_final",
    "jsonrpc_error",
    "parse_jsonrpc",
    "parse_rest",
    "requested_version",
    "rest_error",
    "rewrite_card",
    "skill_object",
    "task_object",
]
