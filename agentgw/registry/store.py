"""The registry's state: SQL rows behind an in-memory snapshot that the data plane reads.

Servers declared in the config file are written at start-up with `source="config"` (GitOps: the file
owns them, the API may not edit them); the admin API and CLI own the rest. The snapshot is rebuilt
on every write made through this process and when another process bumps the version row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, select

from agentgw.registry.models import McpServerRow, McpServerSpec, VirtualServerRow, VirtualServerSpec
from agentgw.storage.owned_rows import OwnedRows

__all__ = ["RegistryConflict", "RegistryStore", "RegistryVersion"]

log = logging.getLogger(__name__)


class RegistryConflict(ValueError):
    """A write that the registry refuses (owned by the config file, or a duplicate name)."""


def _refuse_per_caller(virtual: str, servers: set[str]) -> None:
    # Virtual servers are bridged over sessions shared by every caller: no place for a caller's token.
    if servers:
        raise RegistryConflict(
            f"virtual server {virtual!r} selects {sorted(servers)}, whose credential is per caller (token "
            "exchange, ID-JAG): such servers are served at /mcp/<name> only (docs/decisions/0602)"
        )


def _first_error(exc: ValueError) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}" if where else str(error["msg"])
    return str(exc)


class RegistryVersion(SQLModel, table=True):
    __tablename__ = "registry_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0


# Why a stored server may not run under the rules of today's config (None: it may); the flag says
# whether the config file owns it. See agentgw/registry/admission.py.
Admit = Callable[[McpServerSpec, bool], str | None]


class RegistryStore:
    def __init__(self, engine: Engine, admit: Admit | None = None) -> None:
        self._engine = engine
        self._admit = admit
        self._servers: dict[str, McpServerSpec] = {}
        self._virtual: dict[str, VirtualServerSpec] = {}
        self._sources: dict[str, str] = {}
        # Stored servers that cannot run (a spec no longer valid, or refused by `admit`), with why.
        self._failing: dict[str, str] = {}
        self._version = -1
        self._listeners: list[Callable[[], None]] = []
        self._rows = OwnedRows(engine, RegistryVersion, RegistryConflict, lambda: self.refresh(force=True))

    @property
    def engine(self) -> Engine:
        return self._engine

    # --- reads (hot path: memory only) ---
    def server(self, name: str) -> McpServerSpec | None:
        spec = self._servers.get(name)
        return spec if spec is not None and spec.enabled else None

    def servers(self) -> list[McpServerSpec]:
        return [s for s in self._servers.values() if s.enabled]

    def all_servers(self) -> list[McpServerSpec]:
        return list(self._servers.values())

    def virtual_server(self, name: str) -> VirtualServerSpec | None:
        return self._virtual.get(name)

    def virtual_servers(self) -> list[VirtualServerSpec]:
        return list(self._virtual.values())

    def source_of(self, name: str) -> str | None:
        with Session(self._engine) as session:
            row = session.get(McpServerRow, name)
            return row.source if row else None

    def owner(self, name: str) -> str | None:
        """Who owns server `name` in the snapshot: `config` (the config file) or `api`."""
        return self._sources.get(name)

    def failing_servers(self) -> dict[str, str]:
        """Stored servers left out of the snapshot (an invalid spec, or refused by the rules), with why."""
        return dict(self._failing)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # --- writes ---
    def sync_config(self, servers: Sequence[McpServerSpec], virtual: Sequence[VirtualServerSpec]) -> None:
        """Make the config file's declarations the truth for the rows it owns.

        Raises:
            RegistryConflict: a name is declared twice, or a virtual server selects an undeclared server.
        """
        names = [s.name for s in servers] + [v.name for v in virtual]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise RegistryConflict(
                f"declared more than once (servers and virtual servers share /mcp/<name>): {duplicates}"
            )
        per_caller = {s.name for s in servers if s.per_caller_credential}
        for vspec in virtual:
            selected = vspec.servers()
            if unknown := sorted(selected - {s.name for s in servers}):
                raise RegistryConflict(f"virtual server {vspec.name!r} selects undeclared servers: {unknown}")
            _refuse_per_caller(vspec.name, selected & per_caller)
        self._rows.sync(
            {
                McpServerRow: {s.name: s.model_dump() for s in servers},
                VirtualServerRow: {v.name: v.model_dump() for v in virtual},
            }
        )

    def put_server(self, spec: McpServerSpec, *, replace: bool = False) -> None:
        """Add (or with `replace`, update) an API-owned server.

        Raises:
            RegistryConflict: the name exists (and `replace` is false), a virtual server has it, or the
                config file owns it.
        """

        def check(session: Session) -> None:
            if session.get(VirtualServerRow, spec.name) is not None:
                raise RegistryConflict(f"{spec.name!r} is a virtual server: both are served at /mcp/<name>")
            if spec.per_caller_credential:
                for vrow in session.exec(select(VirtualServerRow)):
                    vspec = VirtualServerSpec.model_validate(vrow.spec)
                    if spec.name in vspec.servers():
                        _refuse_per_caller(vspec.name, {spec.name})

        self._rows.put(
            McpServerRow, spec.name, spec.model_dump(), replace=replace, noun="server", check=check
        )

    def remove_server(self, name: str) -> bool:
        """Remove an API-owned server; returns whether it existed.

        Raises:
            RegistryConflict: the config file owns it.
        """
        return self._rows.remove(McpServerRow, name, noun="server")

    def put_virtual(self, spec: VirtualServerSpec, *, replace: bool = False) -> None:
        """Add (or with `replace`, update) an API-owned virtual server.

        Raises:
            RegistryConflict: the name is taken (by a server, or by a virtual server when not
                replacing), the config file owns it, or a selector names an unknown server.
        """

        def check(session: Session) -> None:
            if session.get(McpServerRow, spec.name) is not None:
                raise RegistryConflict(f"{spec.name!r} is a server: both are served at /mcp/<name>")
            selected = spec.servers()
            rows = {r.name: r for r in session.exec(select(McpServerRow))}
            if unknown := sorted(selected - rows.keys()):
                raise RegistryConflict(
                    f"virtual server {spec.name!r} selects unknown servers: {', '.join(unknown)}"
                )
            per_caller = {
                n for n in selected if McpServerSpec.model_validate(rows[n].spec).per_caller_credential
            }
            _refuse_per_caller(spec.name, per_caller)

        self._rows.put(
            VirtualServerRow,
            spec.name,
            spec.model_dump(),
            replace=replace,
            noun="virtual server",
            check=check,
        )

    def remove_virtual(self, name: str) -> bool:
        """Remove an API-owned virtual server; returns whether it existed.

        Raises:
            RegistryConflict: the config file owns it.
        """
        return self._rows.remove(VirtualServerRow, name, noun="virtual server")

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the snapshot if another writer bumped the version; returns whether it changed."""
        with Session(self._engine) as session:
            version = self._rows.version(session)
            if version == self._version and not force:
                return False
            servers: dict[str, McpServerSpec] = {}
            sources: dict[str, str] = {}
            failing: dict[str, str] = {}
            for r in session.exec(select(McpServerRow)):
                sources[r.name] = r.source
                # One bad row must not stop the gateway or hide the others: it is left out, loudly.
                try:
                    spec = McpServerSpec.model_validate(r.spec)
                except ValueError as exc:
                    failing[r.name] = f"its stored spec is not valid any more: {_first_error(exc)}"
                    continue
                refused = self._admit(spec, r.source == "config") if self._admit is not None else None
                if refused is not None:
                    failing[r.name] = refused
                else:
                    servers[r.name] = spec
            virtual = {
                r.name: VirtualServerSpec.model_validate(r.spec)
                for r in session.exec(select(VirtualServerRow))
            }
        for name, why in failing.items():
            if self._failing.get(name) != why:
                log.error("registry: server %s is not served: %s", name, why)
        self._servers, self._virtual, self._version = servers, virtual, version
        self._sources, self._failing = sources, failing
        for listener in self._listeners:
            listener()
        return True
