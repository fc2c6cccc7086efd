"""The protocol-free vocabulary of the pipeline: who calls (`Principal`), what (`Call`), and the `Reply`.

Ingress adapters build a `Call` from a wire message; filters read and enrich it; the terminal
stage (the upstream client chosen by the ingress) turns it into a `Reply`. Nothing here knows MCP,
A2A or OpenAI shapes: `Reply.payload` is opaque to every filter.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from agentgw.errors import InvalidRunId

__all__ = [
    "ANONYMOUS",
    "RUN_ID_HEADER",
    "RUN_ID_PATTERN",
    "Action",
    "Call",
    "Principal",
    "Protocol",
    "Reply",
    "Settle",
    "Usage",
    "checked_run_id",
    "current_call",
]

Protocol = Literal["mcp", "a2a", "llm"]
# list: discovery; call: invocation; read: resources; send: A2A messages;
# session: protocol control (initialize, ping, ...) that reveals no capability.
Action = Literal["list", "call", "read", "send", "session"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller, as policy sees it.

    Attributes:
        subject: `user:alice`, `client:ci-bot`, or `anonymous`.
        client_id: the OAuth client the token was issued to, if any.
        roles: roles and groups from configured claims (Casbin `g` rules add more).
        scopes: OAuth scopes granted to the token.
        actors: the delegation chain from the `act` claim, outermost (current) actor first.
        credential: the inbound token, kept only for token exchange; never logged or forwarded.
    """

    subject: str
    client_id: str | None = None
    roles: tuple[str, ...] = ()
    scopes: frozenset[str] = frozenset()
    actors: tuple[str, ...] = ()
    credential: str | None = field(default=None, repr=False, compare=False)


ANONYMOUS = Principal(subject="anonymous")

# Request ids: a random prefix per process and a counter, 32 hex digits like a UUID. Unique, not
# secret (they name calls in the audit log), so no call needs to ask the kernel for randomness.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# The HTTP header in which a caller names its run, the same for every protocol.
RUN_ID_HEADER = "agent-run-id"
# A run id is chosen by the caller and keys budgets and audit records, which people read: ASCII
# letters, digits and the punctuation of UUIDs, ULIDs, URNs, e-mail-like and base64 ids, nothing that
# could split or restyle a line where it is shown.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+=~-]{1,128}")


def checked_run_id(value: object, source: str) -> str | None:
    """`value` (from `source`, named in the error) as a run id; None or "" is no run id.

    Raises:
        InvalidRunId: `value` is not a string of 1 to 128 of `A-Z a-z 0-9 - _ . : @ / + = ~`.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or RUN_ID_PATTERN.fullmatch(value) is None:
        raise InvalidRunId(
            f"invalid run id in {source}: use 1 to 128 ASCII letters, digits and - _ . : @ / + = ~"
        )
    return value


@dataclass(slots=True)
class Usage:
    """What a call consumed, for budgets and audit."""

    calls: int = 1
    tokens: int = 0
    cost: float = 0.0
    # The split of `tokens` where a model reports it (trace attributes); 0 and 0 when unknown.
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class Call:
    """One request through the gateway, whatever its protocol.

    Attributes:
        protocol: which ingress built it.
        action: see `Action`.
        resource: the policy object, e.g. `mcp:github/create_issue`; for a list, the listed container
            (`mcp:github`), and `Reply.listing` names the items.
        objects: further objects the call needs `action` on, each decided like `resource` (a request
            that names several resources at once).
        upstream: the registry name of the upstream that will serve it.
        method: the wire method, for audit and logs only (filters must not branch on it).
        credentials: the raw `Authorization` header value from the ingress, for the identity stage.
        endpoint: the gateway path the client called (`/mcp`, `/mcp/github`): its canonical URI is the
            audience a token must carry (RFC 8707) and names the metadata in the OAuth challenge.
        run_id: the agent run this call belongs to (budgets span a run across protocols).
        arguments: the call's arguments, for audit digests and redaction.
        principal: set by the identity stage, or by an ingress that has verified `credentials` at
            `endpoint` already (the stage then only checks its scopes).
        upstream_authorization: set by the credentials stage; the only credential sent upstream.
        upstream_authorization_header: set by the credentials stage: the header that carries
            `upstream_authorization` (an upstream may take its key as `X-Api-Key`, say).
        credential_mode: set by the credentials stage, for audit: how `upstream_authorization` was
            obtained (`none`, `static`, `client_credentials`, `token_exchange`, `id_jag`).
        upstream_actors: set by the credentials stage, for audit: the delegation chain the upstream's
            token carries (`client:<sub>`, current actor first); empty when it carries none.
    """

    protocol: Protocol
    action: Action
    resource: str
    upstream: str
    method: str
    credentials: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    run_id: str | None = None
    session_id: str | None = None
    objects: tuple[str, ...] = ()
    arguments: Mapping[str, Any] | None = field(default=None, repr=False)
    request_id: str = field(default_factory=_request_id)
    principal: Principal | None = None
    upstream_authorization: str | None = field(default=None, repr=False)
    upstream_authorization_header: str = "authorization"
    # False when the ingress answers from the gateway's own copy (an A2A agent's public card):
    # nothing reaches the upstream, so the credentials stage obtains nothing for it.
    reaches_upstream: bool = True
    # True for what anyone may ask without credentials even where the gateway admits no anonymous
    # callers (an A2A agent's public card: it is how a client learns to authenticate). Such a call
    # runs as `anonymous`, so the policy still decides what it shows.
    public: bool = False
    credential_mode: str | None = None
    upstream_actors: tuple[str, ...] = ()
    # Set by the credentials stage for an ingress that may try other upstreams in turn (an LLM
    # route's fallbacks): moves the call to the named upstream, with a credential obtained for it the
    # same way as for the first, so that no ingress or upstream client obtains one itself.
    switch_upstream: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False, compare=False)
    estimate: Usage = field(default_factory=Usage)
    # The policy rule that decided, for audit (`None` when no rule was consulted).
    decided_by: str | None = None
    # The W3C trace the call belongs to, for logs, once tracing sets it.
    trace_id: str | None = None


@dataclass(slots=True)
class Reply:
    """What the terminal stage produced.

    Attributes:
        payload: protocol-specific result the ingress renders; opaque to filters.
        listing: for discovery calls, the policy object of every listed item, in order; the policy
            stage narrows it and the ingress keeps only the items still named.
        status: outcome for audit (`ok`, `error`, `upstream_error`, ...).
        usage: what the call actually consumed, when the upstream reports it.
        streaming: the answer is still flowing when the pipeline returns (an SSE stream), so its
            usage is known only at its end. Stages that account for usage (budget settle, audit
            tokens and cost) then register with `on_settle` on the way back instead of reading
            `usage`; the ingress awaits `settle(usage, status)` exactly once when the stream ends,
            whether it completed, the upstream cut it, or the client went away.
    """

    payload: Any = None
    listing: Sequence[str] | None = None
    status: str = "ok"
    usage: Usage | None = None
    streaming: bool = False
    # Why a streamed answer ended badly, for audit (set by `settle`).
    detail: str | None = None
    _settle_hooks: list[Settle] = field(default_factory=list, init=False, repr=False, compare=False)

    def on_settle(self, hook: Settle) -> None:
        """Have `hook` called with the final usage when a streamed answer ends (inner stages first)."""
        self._settle_hooks.append(hook)

    async def settle(self, usage: Usage, status: str | None = None, detail: str | None = None) -> None:
        """Record the final usage (and outcome, with `detail` saying what went wrong) of a streamed
        answer and tell every registered hook.

        Every hook runs even if an earlier one fails, so one broken stage cannot leak another's
        reservation; hooks run once (a second call is a no-op for them).

        Raises:
            Exception: the first error a hook raised, after all hooks have run.
        """
        self.usage = usage
        if status is not None:
            self.status = status
        self.detail = detail
        hooks, self._settle_hooks = self._settle_hooks, []
        first: Exception | None = None
        for hook in hooks:
            try:
                await hook(usage)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


# Called with the final usage of a streamed answer; see `Reply.settle`.
Settle = Callable[[Usage], Awaitable[None]]

# The call the pipeline is running in this task, so that a log line written meanwhile names it
# (`agentgw.log_format`); None outside a call.
current_call: ContextVar[Call | None] = ContextVar("current_call", default=None)
