"""Everything built once at start-up: the stores, the stages in their order, the upstream clients
and the ingress adapters (`build_gateway`), and what reports on them (readiness, metrics)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter
from sqlalchemy import Engine

from agentgw.errors import ConfigError, Unavailable
from agentgw.filters.audit import Audit
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.budget import Budget, BudgetStore
from agentgw.filters.credentials import Credentials, MemoryTokenCache, TokenService
from agentgw.health import Readiness
from agentgw.identity import Identity, build_identity, signing_key_path
from agentgw.ingress.a2a import A2aIngress
from agentgw.ingress.a2a.signatures import card_signer
from agentgw.ingress.llm import LlmIngress
from agentgw.ingress.mcp.bridge import Bridge
from agentgw.ingress.mcp.forwarding import Forwarder
from agentgw.ingress.mcp.passthrough import PassThrough
from agentgw.ingress.mcp.sessions import MemorySessionStore, RedisSessionStore, SessionLimits, SessionStore
from agentgw.metrics import Known, Metrics, State
from agentgw.oauth.server import oauth_router
from agentgw.pipeline import Pipeline, ordered
from agentgw.records.audit import timestamp
from agentgw.registry.catalog import Catalog
from agentgw.registry.folder import RegistryFolder
from agentgw.registry.llm import token_upstreams as llm_token_upstreams
from agentgw.registry.pins import PinGate, PinningMode, Pins
from agentgw.registry.secrets import SecretRefused, Secrets, SecretUnavailable
from agentgw.registry.store import RegistryStore
from agentgw.settings import Settings
from agentgw.storage import create_db, ensure_private_dir, in_thread, make_engine, select_one
from agentgw.storage.audit import AuditQuery, SqlAuditLog, checkpointer, iter_records, trust
from agentgw.storage.budget import LocalBudgetStore, budget_store
from agentgw.storage.budget.rules import BudgetRuleBook
from agentgw.storage.task_owners import RedisTaskOwners
from agentgw.storage.token_cache import RedisTokenStore
from agentgw.tracing import Tracing
from agentgw.upstream.http import DEFAULT_LIMITS, HttpClient, Limits
from agentgw.upstream.mcp import McpHttpUpstream
from agentgw.upstream.mcp_sessions import UpstreamSessions

__all__ = ["Gateway", "build_gateway", "upstream_states"]

log = logging.getLogger(__name__)

# A budget counter key no rule makes: reading it reaches the store and finds nothing.
READY_PROBE_KEY = "agentgw:readyz"


@dataclass
class Gateway:
    """Everything built once at start-up; ingress adapters and admin routes share it."""

    settings: Settings
    registry: RegistryStore
    authenticate: Authenticate
    authorizer: CasbinAuthorizer
    pipeline: Pipeline
    mcp_upstream: McpHttpUpstream
    passthrough: PassThrough
    sessions: UpstreamSessions
    bridge: Bridge
    llm: LlmIngress
    audit_log: SqlAuditLog
    budget_rules: BudgetRuleBook
    budget_store: BudgetStore
    identity: Identity
    a2a: A2aIngress
    credentials: Credentials | None = None
    readiness: Readiness | None = None
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    catalog: Catalog | None = None
    folder: RegistryFolder | None = None
    pins: Pins | None = None
    nodes: Forwarder | None = None


def _forwarder(settings: Settings, limits: Limits) -> Forwarder | None:
    """What sends requests for bridged sessions on to the node that holds them: only when the nodes
    share bindings (Redis) and this node has a URL the others can reach."""
    if not settings.redis_url:
        return None
    me = settings.own_node_url()
    if me is None:
        log.warning(
            "bridged MCP sessions stay on the node that opened them: set node_url (this node's loopback "
            "or private address) so that other nodes forward their requests here"
        )
        return None
    return Forwarder(
        me,
        wait_s=settings.upstream_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        http=HttpClient(limits=limits),
    )


def build_gateway(settings: Settings, span_exporter: SpanExporter | None = None) -> Gateway:
    """Build the stores and the pipeline (`span_exporter`: see `Tracing`).

    Raises:
        PolicyError: the policy is unreadable, malformed, or empty when that is not allowed.
        ConfigError: an LLM route's, A2A agent's or MCP upstream's secret is missing or unreadable.
    """
    ensure_private_dir(settings.data_dir)
    engine = make_engine(settings.database_url, settings.database)
    create_db(engine)
    admission = settings.admission()
    # A stored server today's rules refuse (a secret not declared for it, a stdio command not allowed,
    # a spec no longer valid) is left out and reported, never a reason not to start.
    registry = RegistryStore(
        engine, lambda spec, from_config: admission.refusal(spec, from_config=from_config)
    )
    folder = RegistryFolder(settings.registry.folder) if settings.registry.folder is not None else None
    registry.sync_config([*settings.servers, *(folder.load() if folder else [])], settings.virtual_servers)
    authorizer = CasbinAuthorizer(
        settings.policy.model,
        settings.policy.file,
        settings.policy.rules,
        allow_empty=settings.policy.allow_empty,
        database=engine if settings.policy.database else None,
    )
    identity = build_identity(settings, engine, registry)
    authenticate = identity.authenticate
    # A2A agents' credentials are served by the same stage as MCP upstreams'.
    a2a_tokens = {a.name: a.credentialed() for a in settings.a2a_agents if a.enabled}
    llm_tokens = llm_token_upstreams(settings.llm_routes)  # and so are LLM routes' credentials
    credentials = Credentials(
        registry.server,
        agents=a2a_tokens.get,
        models=llm_tokens.get,
        builtin=_builtin_token_service(settings, identity),
        cache=MemoryTokenCache(shared=_shared_tokens(settings, admission.secrets)),
        secrets=admission.secrets,
    )
    # A missing secret of the config file's upstreams stops start-up: the file is wrong. One of a server
    # added through the admin API fails that server's calls only (and says so in the log and status).
    owned = [s for s in registry.servers() if registry.owner(s.name) == "config"]
    credentials.prepare([*owned, *a2a_tokens.values(), *llm_tokens.values()])
    for spec in registry.servers():
        if registry.owner(spec.name) != "config" and (problem := admission.problem(spec, from_config=False)):
            log.error("registry: server %s is failing: %s", spec.name, problem)
    audit_engine = (
        make_engine(settings.audit.database_url, settings.database) if settings.audit.database_url else engine
    )
    # The checkpoint key lives beside the signing key, out of the database (decision 0215).
    key_dir = signing_key_path(settings).parent
    audit_log = SqlAuditLog(
        audit_engine,
        settings.audit,
        checkpointer=checkpointer(settings.audit.checkpoints, key_dir),
        trust=trust(settings.audit.checkpoints, key_dir),
        timeout_s=settings.database.statement_timeout_s,
    )
    audit = Audit(audit_log, settings.audit.redact)
    budget_rules = BudgetRuleBook(engine)
    budget_rules.sync_config(settings.budgets.rules)
    budgets = budget_store(
        settings.budgets, engine, settings.redis_url, database=settings.database, redis=settings.redis
    )
    if isinstance(budgets, LocalBudgetStore) and budgets.recover_since is not None:
        _recount(budgets, budget_rules, audit_engine, settings.budgets.run_ttl_s)
    pipeline = ordered(
        audit=audit,
        authenticate=authenticate,
        authorize=Authorize(authorizer),
        budget=Budget(budgets, budget_rules, run_ttl_s=settings.budgets.run_ttl_s),
        credentials=credentials,
        admitted=audit.admitted,
    )
    tracing = Tracing(settings.tracing, span_exporter)
    pipeline = tracing.pipeline(pipeline)
    limits = DEFAULT_LIMITS.over(settings.upstream_limits)
    upstream = McpHttpUpstream(limits=limits)
    # Sessions in Redis let any node continue a session another node started.
    session_limits = SessionLimits(
        per_principal=settings.max_sessions_per_principal,
        total=settings.max_sessions,
        idle_s=settings.session_idle_s,
    )
    mcp_sessions: SessionStore = (
        RedisSessionStore(settings.redis_url, limits=session_limits, settings=settings.redis)
        if settings.redis_url
        else MemorySessionStore(session_limits)
    )
    passthrough = PassThrough(pipeline, upstream, mcp_sessions, settings.max_body_bytes)
    pins = Pins(engine)

    def pinning_of(server: str) -> PinningMode:
        spec = registry.server(server)
        return (spec.pinning if spec is not None else None) or settings.registry.pinning

    passthrough.pins = PinGate(pins, pinning_of)
    sessions = UpstreamSessions(credentials.session_credential)
    bridge = Bridge(
        pipeline,
        sessions,
        separator=settings.namespace_separator,
        list_timeout_s=settings.list_timeout_s,
        page_size=settings.list_page_size,
        max_body_bytes=settings.max_body_bytes,
        bindings=mcp_sessions,
        session_limits=session_limits,
    )
    bridge.pins = passthrough.pins
    nodes = _forwarder(settings, limits)
    bridge.nodes = bridge.sse.nodes = nodes
    bridge.fast_path = settings.bridge_fast_path
    sessions.on_list_changed(bridge.on_list_changed)
    llm = LlmIngress.build(
        settings.llm_routes,
        pipeline,
        max_body_bytes=settings.max_body_bytes,
        limits=limits,
    )
    a2a = A2aIngress.build(
        settings.a2a_agents,
        pipeline,
        base_url=settings.base_url,
        allow_anonymous=settings.allow_anonymous,
        max_body_bytes=settings.max_body_bytes,
        signer=card_signer(settings.a2a_sign_cards, identity.keys, settings.base_url),
        limits=limits,
        # With Redis, a task created through one node is followed up through any other.
        owners=RedisTaskOwners(settings.redis_url, settings=settings.redis) if settings.redis_url else None,
    )
    readiness = _readiness(
        policy=engine if settings.policy.database else None,
        budgets=budgets,
        audit_log=audit_log,
        upstreams=lambda: upstream_states(upstream, sessions, llm, a2a),
    )
    metrics = None
    if settings.metrics.enabled:
        cache = credentials.cache
        metrics = Metrics(
            pipeline.stages,
            known=_known_upstream(settings, registry),
            state=State(
                upstreams=lambda: upstream_states(upstream, sessions, llm, a2a),
                token_cache=(lambda: cache.lookups) if isinstance(cache, MemoryTokenCache) else None,
                audit_backlog=audit_log.backlog,
                audit_problem=audit_log.problem,
                audit_commits=lambda: audit_log.commits,
            ),
            principal_labels=settings.metrics.principal_labels,
        )
        pipeline.observer = metrics
    return Gateway(
        settings,
        registry,
        authenticate,
        authorizer,
        pipeline,
        upstream,
        passthrough,
        sessions,
        bridge,
        llm,
        audit_log=audit_log,
        budget_rules=budget_rules,
        budget_store=budgets,
        identity=identity,
        a2a=a2a,
        credentials=credentials,
        readiness=readiness,
        metrics=metrics,
        tracing=tracing,
        folder=folder,
        pins=pins,
        nodes=nodes,
    )


def _readiness(
    *,
    policy: Engine | None,
    budgets: BudgetStore,
    audit_log: SqlAuditLog,
    upstreams: Callable[[], dict[str, dict[str, Any]]],
) -> Readiness:
    """The stores a call needs, each with a probe that raises when it cannot be used."""

    async def probe_policy() -> None:
        if policy is not None:  # rules in the database; a file policy is in memory once loaded
            await in_thread(partial(select_one, policy))

    async def probe_budgets() -> None:
        # Taking nothing asks whether the store admits calls at all (a local ledger that cannot save
        # its counters refuses); one read reaches its database or Redis.
        await budgets.reserve((), time.time())
        await budgets.used([READY_PROBE_KEY])

    async def probe_audit() -> None:
        problem = audit_log.problem()
        if problem is not None:
            raise Unavailable(problem)
        await in_thread(partial(select_one, audit_log.engine))

    stores = {"policy": probe_policy, "budget_store": probe_budgets, "audit_log": probe_audit}
    return Readiness(stores, upstreams)


def _known_upstream(settings: Settings, registry: RegistryStore) -> Known:
    """Whether a call's upstream name is one the gateway defines (metrics label no other)."""
    models = {route.name for route in settings.llm_routes}
    agents = {agent.name for agent in settings.a2a_agents}

    def known(protocol: str, name: str) -> bool:
        if protocol == "mcp":  # `*`: the merged endpoint, /mcp
            return (
                name == "*" or registry.server(name) is not None or registry.virtual_server(name) is not None
            )
        if protocol == "llm":  # "": the model listing
            return name == "" or name in models
        return name in agents

    return known


def upstream_states(
    mcp: McpHttpUpstream, bridge: UpstreamSessions, llm: LlmIngress, a2a: A2aIngress
) -> dict[str, dict[str, Any]]:
    """Each upstream's last known state, from what calls found (nothing is probed here)."""
    out: dict[str, dict[str, Any]] = {}
    for who, state in (*mcp.states().items(), *a2a.upstream_states().items(), *llm.upstream_states().items()):
        entry: dict[str, Any] = {"ok": state.ok, "since": timestamp(state.at)}
        if not state.ok:
            entry["reason"] = state.detail
        out[who] = entry
    for name, up in bridge.connected().items():
        out[f"upstream {name!r} (bridge session)"] = (
            {"ok": up} if up else {"ok": False, "reason": "not connected"}
        )
    return out


def _recount(ledger: LocalBudgetStore, rules: BudgetRuleBook, audit_engine: Engine, run_ttl_s: float) -> None:
    """The last owner of the budget ledger crashed: recount what it spent after its last save from the
    audit log (whose journal `SqlAuditLog` has already replayed), so that no run starts afresh."""
    assert ledger.recover_since is not None
    since = timestamp(ledger.recover_since)
    records = iter_records(audit_engine, AuditQuery(since=since))
    calls = ledger.recount([rule for rule, _ in rules.rules()], records, run_ttl_s)
    log.warning(
        "budget ledger: the last gateway process stopped without saving its counters; "
        "%d calls since %s recounted from the audit log",
        calls,
        since,
    )


def _shared_tokens(settings: Settings, secrets: Secrets) -> RedisTokenStore | None:
    """The token cache every node shares: Redis, with tokens encrypted under the operator's secret.

    Raises:
        ConfigError: the named secret cannot be read or is too short.
    """
    name = settings.token_cache.secret
    if settings.redis_url is None or name is None:
        if settings.redis_url is not None:
            log.info("token_cache.secret is not set: exchanged upstream tokens are cached per node")
        return None
    try:
        secret = secrets.read(name)
    except SecretUnavailable as exc:
        log.error("token_cache: secret %r: %s", name, exc.detail)
        raise ConfigError(f"token_cache: {exc}") from exc
    except SecretRefused as exc:
        raise ConfigError(f"token_cache: {exc}") from exc
    try:
        return RedisTokenStore(
            settings.redis_url,
            secret.reveal(),
            prefix=settings.token_cache.redis_prefix,
            timeout_s=settings.token_cache.timeout_s,
            settings=settings.redis,
        )
    except ValueError as exc:
        raise ConfigError(f"token_cache: secret {name!r}: {exc}") from exc


def _builtin_token_service(settings: Settings, identity: Identity) -> TokenService | None:
    """The built-in authorization server's token endpoint, reached in-process (no loopback HTTP, which
    a public URL behind a load balancer would send elsewhere)."""
    if identity.server is None:
        return None
    app = FastAPI()
    app.include_router(oauth_router(identity.server))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=settings.base_url)
    return TokenService(f"{settings.base_url}/oauth/token", http)
