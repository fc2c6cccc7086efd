"""The registry's state: SQL rows behind an in-memory snapshot that the data plane reads.

Servers declared in the config file are written at start-up with `source="config"` (GitOps: the file
owns them, the API may not edit them); the admin API and CLI own the rest. The snapshot is rebuilt
on every write made through this process and when another process bumps the version row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, select

from registry.models import McpServerRow, McpServerSpec, VirtualServerRow, VirtualServerSpec

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


class RegistryVersion(SQLModel, table=True):
    __tablename__ = "registry_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0


class RegistryStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._servers: dict[str, McpServerSpec] = {}
        self._virtual: dict[str, VirtualServerSpec] = {}
        self._version = -1
        self._listeners: list[Callable[[], None]] = []

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
            selected = {sel.partition("/")[0] for sel in (*vspec.tools, *vspec.prompts, *vspec.resources)}
            if unknown := sorted(selected - {s.name for s in servers}):
                raise RegistryConflict(f"virtual server {vspec.name!r} selects undeclared servers: {unknown}")
            _refuse_per_caller(vspec.name, selected & per_caller)
        with Session(self._engine) as session:
            server_names = {s.name for s in servers}
            for row in session.exec(select(McpServerRow).where(McpServerRow.source == "config")).all():
                if row.name not in server_names:
                    session.delete(row)
            virtual_names = {v.name for v in virtual}
            for vrow in session.exec(
                select(VirtualServerRow).where(VirtualServerRow.source == "config")
            ).all():
                if vrow.name not in virtual_names:
                    session.delete(vrow)
            for spec in servers:
                session.merge(McpServerRow(name=spec.name, spec=spec.model_dump(), source="config"))
            for vspec in virtual:
                session.merge(VirtualServerRow(name=vspec.name, spec=vspec.model_dump(), source="config"))
            self._bump(session)
            session.commit()
        self.refresh(force=True)

    def put_server(self, spec: McpServerSpec, *, replace: bool = False) -> None:
        """Add (or with `replace`, update) an API-owned server.

        Raises:
            RegistryConflict: the name exists (and `replace` is false), a virtual server has it, or the
                config file owns it.
        """
        with Session(self._engine) as session:
            if session.get(VirtualServerRow, spec.name) is not None:
                raise RegistryConflict(f"{spec.name!r} is a virtual server: both are served at /mcp/<name>")
            row = session.get(McpServerRow, spec.name)
            if row is not None and row.source == "config":
                raise RegistryConflict(f"server {spec.name!r} is declared in the config file; edit it there")
            if row is not None and not replace:
                raise RegistryConflict(f"server {spec.name!r} already exists")
            if spec.per_caller_credential:
                for vrow in session.exec(select(VirtualServerRow)):
                    vspec = VirtualServerSpec.model_validate(vrow.spec)
                    if spec.name in {
                        sel.partition("/")[0] for sel in (*vspec.tools, *vspec.prompts, *vspec.resources)
                    }:
                        _refuse_per_caller(vspec.name, {spec.name})
            session.merge(McpServerRow(name=spec.name, spec=spec.model_dump(), source="api"))
            self._bump(session)
            session.commit()
        self.refresh(force=True)

    def remove_server(self, name: str) -> bool:
        """Remove an API-owned server; returns whether it existed.

        Raises:
            RegistryConflict: the config file owns it.
        """
        with Session(self._engine) as session:
            row = session.get(McpServerRow, name)
            if row is None:
                return False
            if row.source == "config":
                raise RegistryConflict(f"server {name!r} is declared in the config file; edit it there")
            session.delete(row)
            self._bump(session)
            session.commit()
        self.refresh(force=True)
        return True

    def put_virtual(self, spec: VirtualServerSpec, *, replace: bool = False) -> None:
        """Add (or with `replace`, update) an API-owned virtual server.

        Raises:
            RegistryConflict: the name is taken (by a server, or by a virtual server when not
                replacing), the config file owns it, or a selector names an unknown server.
        """
        with Session(self._engine) as session:
            if session.get(McpServerRow, spec.name) is not None:
                raise RegistryConflict(f"{spec.name!r} is a server: both are served at /mcp/<name>")
            unknown = sorted(
                {sel.partition("/")[0] for sel in (*spec.tools, *spec.prompts, *spec.resources)}
                - {r.name for r in session.exec(select(McpServerRow))}
            )
            if unknown:
                raise RegistryConflict(
                    f"virtual server {spec.name!r} selects unknown servers: {', '.join(unknown)}"
                )
            selected = {sel.partition("/")[0] for sel in (*spec.tools, *spec.prompts, *spec.resources)}
            _refuse_per_caller(
                spec.name,
                {
                    r.name
                    for r in session.exec(select(McpServerRow))
                    if r.name in selected and McpServerSpec.model_validate(r.spec).per_caller_credential
                },
            )
            row = session.get(VirtualServerRow, spec.name)
            if row is not None and row.source == "config":
                raise RegistryConflict(
                    f"virtual server {spec.name!r} is declared in the config file; edit it there"
                )
            if row is not None and not replace:
                raise RegistryConflict(f"virtual server {spec.name!r} already exists")
            session.merge(VirtualServerRow(name=spec.name, spec=spec.model_dump(), source="api"))
            self._bump(session)
            session.commit()
        self.refresh(force=True)

    def remove_virtual(self, name: str) -> bool:
        """Remove an API-owned virtual server; returns whether it existed.

        Raises:
            RegistryConflict: the config file owns it.
        """
        with Session(self._engine) as session:
            row = session.get(VirtualServerRow, name)
            if row is None:
                return False
            if row.source == "config":
                raise RegistryConflict(
                    f"virtual server {name!r} is declared in the config file; edit it there"
                )
            session.delete(row)
            self._bump(session)
            session.commit()
        self.refresh(force=True)
        return True

    def _bump(self, session: Session) -> None:
        row = session.get(RegistryVersion, 1) or RegistryVersion()
        row.version += 1
        session.add(row)

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the snapshot if another writer bumped the version; returns whether it changed."""
        with Session(self._engine) as session:
            row = session.get(RegistryVersion, 1)
            version = row.version if row else 0
            if version == self._version and not force:
                return False
            servers = {
                r.name: McpServerSpec.model_validate(r.spec) for r in session.exec(select(McpServerRow))
            }
            virtual = {
                r.name: VirtualServerSpec.model_validate(r.spec)
                for r in session.exec(select(VirtualServerRow))
            }
        self._servers, self._virtual, self._version = servers, virtual, version
        for listener in self._listeners:
            listener()
        return True
