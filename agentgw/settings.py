"""One typed settings object: environment variables `AGENTGW_*` over an optional YAML config file.

The config file is the GitOps source for upstreams, virtual servers and policy; environment
variables override scalar settings (host, port, database URL, ...). Values in the file may name
environment variables as `${NAME}` so that one file serves several machines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url

from agentgw.console import ConsoleSettings
from agentgw.errors import ConfigError
from agentgw.fetch_guard import parse_allow
from agentgw.ingress.mcp.forwarding import node_url_error
from agentgw.metrics import MetricsSettings
from agentgw.oauth.config import AuthSettings
from agentgw.records.audit import AuditSettings
from agentgw.records.budget import BudgetSettings
from agentgw.registry.a2a import A2aAgentSpec, A2aCredential
from agentgw.registry.admission import Admission
from agentgw.registry.catalog import RegistrySettings
from agentgw.registry.llm import LlmRouteList, route_secrets
from agentgw.registry.models import McpServerSpec, UpstreamLimits, VirtualServerSpec, credential_secrets
from agentgw.registry.secrets import SecretRefused, Secrets, SecretSource
from agentgw.storage.db import DatabaseSettings
from agentgw.storage.redis_client import RedisSettings
from agentgw.storage.token_cache import TokenCacheSettings
from agentgw.tracing import TracingSettings

__all__ = ["PolicySettings", "Settings", "load_settings"]

_ENV_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")
PACKAGE_POLICIES = Path(__file__).parent / "policies"


class PolicySettings(BaseModel):
    """Where the Casbin policy comes from."""

    model: Path = PACKAGE_POLICIES / "model.conf"
    file: Path | None = None
    # Inline policy lines (CSV rows such as `p, anonymous, mcp:demo/*, *, allow`), added to the file's.
    rules: list[str] = Field(default_factory=list)
    # Default deny makes an empty policy a gateway that refuses everything: almost always a mistake.
    allow_empty: bool = False
    # Also keep rules in the database (Casbin SQL adapter), editable through /admin/policies.
    database: bool = False


class Settings(BaseSettings):
    """Everything the gateway is configured with; built once at start-up and passed down."""

    model_config = SettingsConfigDict(env_prefix="AGENTGW_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    # The gateway's canonical URL as clients see it (RFC 8707 audience, metadata documents).
    public_url: str | None = None
    # The gateway's own state: the SQLite database and its audit journal (unless database_url says
    # otherwise), the built-in authorization server's signing keys. Created owner-only (0700).
    data_dir: Path = Path(".agentgw")
    # Default: SQLite in data_dir (`sqlite:///<data_dir>/agentgw.db`).
    database_url: str = ""
    # Pool and time limits of a server database (PostgreSQL): `database_url` and `audit.database_url`.
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    config_file: Path | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_timeout_s: float = 30.0
    # Connections, streams and answer sizes per upstream; each upstream's own `limits` go over these.
    upstream_limits: UpstreamLimits = Field(default_factory=UpstreamLimits)
    # Client connections: closed when idle this long between requests (or before the first one), and
    # when a request's headers and body have not all arrived this long after it started (slow clients).
    client_idle_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    client_read_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Per-upstream budget for a fan-out list on /mcp: a slow upstream drops out, it does not stall.
    list_timeout_s: float = 5.0
    namespace_separator: str = "__"
    # Items per page of the merged catalog's lists (gateway-minted cursors).
    list_page_size: int = Field(default=100, ge=1, le=1000)
    # 2026-07-28 requests to bridged endpoints take the gateway's own data path (decision 0010); off,
    # the SDK's server serves every one of them, as it serves the handshake era.
    bridge_fast_path: bool = True
    # Host names the gateway answers to (DNS-rebinding defence). Empty: loopback names, plus the host
    # of public_url; binding a non-loopback address without either answers any host (and warns).
    allowed_hosts: list[str] = Field(default_factory=list)
    # Callers without credentials become the principal `anonymous`; policy still decides what it may do.
    allow_anonymous: bool = False
    # Shared state for scale-out (MCP session bindings): redis://host:port/db. Unset: in-process.
    redis_url: str | None = None
    # This node's own URL, as the other nodes reach it (loopback or private IP address): a request for a
    # bridged session this node holds is forwarded here by the node that gets it. Unset: derived from
    # host and port when host is such an address (agentgw/ingress/mcp/forwarding.py).
    node_url: str | None = None
    # Legacy-era MCP sessions (Mcp-Session-Id), on every node together when redis_url is set: at most
    # this many open per principal and in all; one unused for session_idle_s expires.
    max_sessions_per_principal: int = Field(default=100, ge=1)
    max_sessions: int = Field(default=10_000, ge=1)
    session_idle_s: float = Field(default=3600.0, gt=0)
    # Request bodies of the admin API (and the other routes behind FastAPI's stack); larger ones get 413.
    admin_max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Pool and time limits of each Redis client (budget counters, MCP sessions).
    redis: RedisSettings = Field(default_factory=RedisSettings)
    # Exchanged upstream tokens in Redis for every node (with redis_url and a named secret that keys
    # their encryption); see agentgw/storage/token_cache.py.
    token_cache: TokenCacheSettings = Field(default_factory=TokenCacheSettings)
    log_level: str = "INFO"
    # `json`: one JSON object per log line (agentgw/log_format.py); `text`: one plain line.
    log_format: Literal["text", "json"] = "text"
    # Prometheus metrics at /metrics (agentgw/metrics.py).
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # OpenTelemetry traces (agentgw/tracing.py): none exported unless an exporter is set.
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    # The web console at /console (agentgw/console/), logged into through the built-in authorization server.
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    # Mount the built-in demo upstream at /_demo/mcp (used by `agentgw serve` with no config).
    demo: bool = False
    policy: PolicySettings = Field(default_factory=PolicySettings)
    # What fetches of caller-chosen URLs (Client ID Metadata Documents) may reach although it is not a
    # public address: IPs, CIDRs (`10.20.0.0/16`) or host names. Empty: public addresses only
    # (agentgw/fetch_guard.py).
    fetch_allow: list[str] = Field(default_factory=list)
    # PEM file of certificate authorities trusted for those fetches besides the system's (an
    # internal CA that signs the hosts of client metadata documents).
    fetch_ca_file: Path | None = None
    # Trusted token issuers, the built-in authorization server, API keys; see agentgw/oauth/config.py.
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # Run and principal budgets (rate limits included); see agentgw/records/budget.py.
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    # The hash-chained audit log: redaction, retention, its own database; see agentgw/records/audit.py.
    audit: AuditSettings = Field(default_factory=AuditSettings)
    servers: list[McpServerSpec] = Field(default_factory=list)
    virtual_servers: list[VirtualServerSpec] = Field(default_factory=list)
    # How the registry is published (the MCP Registry API at /v0.1); see agentgw/registry/catalog.py.
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    # Virtual models served at /v1 (see agentgw/registry/llm.py); secrets are named, never inline.
    llm_routes: LlmRouteList = Field(default_factory=list)
    # A2A agents served at /a2a/<name> (see agentgw/registry/a2a.py); secrets are named, never inline.
    a2a_agents: list[A2aAgentSpec] = Field(default_factory=list)
    # Named secrets for upstream credentials (registry/secrets.py): specs name them, never locate them.
    secrets: dict[str, SecretSource] = Field(default_factory=dict)
    # Command lines a stdio server registered outside the config file may run (with admin:exec for
    # the admin API); each entry is `[command, *leading args]`. Empty: stdio servers come from this file.
    stdio_allowed_commands: list[Annotated[list[str], Field(min_length=1)]] = Field(default_factory=list)
    # Sign the A2A cards the gateway serves with the built-in authorization server's key (JWKS at
    # /oauth/jwks). Unset: on when the built-in server is enabled; true without it is a config error.
    a2a_sign_cards: bool | None = None

    @field_validator("node_url")
    @classmethod
    def _node_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := node_url_error(value)):
            raise ValueError(f"node_url {value!r}: {problem}")
        return value.rstrip("/") if value is not None else None

    def own_node_url(self) -> str | None:
        """`node_url`, else `http://host:port` when that is a loopback or private address; else None."""
        if self.node_url is not None:
            return self.node_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        derived = f"http://{host}:{self.port}"
        return None if node_url_error(derived) else derived

    @field_validator("fetch_allow")
    @classmethod
    def _fetch_allow(cls, value: list[str]) -> list[str]:
        parse_allow(value)
        return value

    @model_validator(mode="after")
    def _state_and_secrets(self) -> Settings:
        if not self.database_url:
            # Derived, so not marked as set: settings rebuilt with another data_dir derive it again.
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'agentgw.db'}")
        admission = self.admission()  # its secrets refuse the gateway's own files
        if self.token_cache.secret is not None and self.token_cache.secret not in self.secrets:
            raise ValueError(
                f"token_cache.secret: no secret {self.token_cache.secret!r} is declared under secrets"
            )
        for spec in self.servers:
            if refused := admission.refusal(spec, from_config=True):
                raise ValueError(f"server {spec.name!r}: {refused}")
        uses = [(f"llm route {r.name!r}", route_secrets(r)) for r in self.llm_routes]
        for agent in self.a2a_agents:
            credential, where = agent.credential, agent.resource_url()
            if isinstance(credential, A2aCredential):
                named = [(credential.secret, where)] if credential.secret else []
            else:
                named = credential_secrets(credential, where)
            uses.append((f"A2A agent {agent.name!r}", named))
        for what, named in uses:
            for name, destination in named:
                destinations = [destination or admission.builtin_token_url]
                try:
                    admission.secrets.check(name, destinations, from_config=True)
                except SecretRefused as exc:
                    raise ValueError(f"{what}: {exc}") from exc
        return self

    def protected_paths(self) -> list[Path]:
        """The gateway's own files, never read as an upstream secret: the data directory, the
        databases (with their SQLite side files and audit journal), the signing keys, the config file,
        the process's own state."""
        # /proc: the process's own environment and memory (`/proc/self/environ`) hold the settings.
        paths = [self.data_dir, Path("/proc"), *([self.config_file] if self.config_file else [])]
        # Named itself, not only as a file in data_dir: a hard link elsewhere is caught by its inode.
        paths.append(self.auth.builtin.signing_key or self.data_dir / "oauth-keys.json")
        for url in (self.database_url, self.audit.database_url):
            parsed = make_url(url) if url else None
            if parsed is None or parsed.get_backend_name() != "sqlite":
                continue
            if parsed.database and parsed.database != ":memory:":
                ends = ("", "-wal", "-shm", ".audit-journal")
                paths += [Path(f"{parsed.database}{end}") for end in ends]
        return paths

    def admission(self) -> Admission:
        """The registry's rules under this config: its secrets, its stdio allow-list.

        Raises:
            SecretRefused: a declared secret is the gateway's own file.
        """
        return Admission(
            Secrets(self.secrets, self.protected_paths()),
            self.stdio_allowed_commands,
            f"{self.base_url}/oauth/token",
        )

    def trusted_hosts(self) -> list[str]:
        """The Host header values the gateway accepts (`*` for any)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        hosts = ["127.0.0.1", "localhost", "::1", "[::1]"]
        if self.public_url:
            hosts.append(urlsplit(self.public_url).hostname or "")
        elif self.host not in ("127.0.0.1", "localhost", "::1"):
            return ["*"]
        return hosts

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the config file (passed as init arguments).
        return (env_settings, init_settings)


def _expand(value: Any, path: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}") for k, v in value.items()}
    return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment and explicit overrides.

    Raises:
        ConfigError: the file is unreadable, not YAML, or has invalid fields.
    """
    config_file = config_file or (
        Path(os.environ["AGENTGW_CONFIG"]) if "AGENTGW_CONFIG" in os.environ else None
    )
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
        data = _expand(loaded, str(config_file))
        # Relative policy paths are relative to the config file, so a config directory is portable.
        policy = data.get("policy") or {}
        for key in ("model", "file"):
            if isinstance(policy.get(key), str):
                policy[key] = str((config_file.parent / policy[key]).resolve())
        registry = data.get("registry") or {}
        if isinstance(registry, dict) and isinstance(registry.get("folder"), str):
            registry["folder"] = str((config_file.parent / registry["folder"]).resolve())
        data["config_file"] = config_file
    try:
        settings = Settings(**data)
        dumped = settings.model_dump()
        if "database_url" not in settings.model_fields_set:
            del dumped["database_url"]  # derived from data_dir, which an override may change
        # Command-line options are the most specific statement of intent: they win over everything.
        return Settings.model_validate(dumped | {k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
