"""The registry as the MCP Registry API publishes it: one `server.json` document per upstream.

Each document's remote is the gateway's own URL for the server (`<base>/mcp/<name>`), never the
upstream's: a client that found a server here connects through the gateway. The upstream's URL, its
credential and its command stay out of every document.

The times an entry was first published and last changed are kept in a table of their own, updated
whenever the registry's snapshot changes: a server whose spec changed gets a new `updatedAt`, and a
server removed from the registry stays listed as `deleted` for readers that ask what changed since
(`updated_since`), so a mirror can drop it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, select

from agentgw.registry.models import McpServerSpec

__all__ = [
    "SCHEMA_URL",
    "Catalog",
    "CatalogEntry",
    "CatalogRow",
    "RegistrySettings",
    "default_namespace",
    "server_json",
]

log = logging.getLogger(__name__)

# The newest released server.json schema (the official registry's `CurrentSchemaVersion`).
SCHEMA_URL = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"
# The schema's pattern for the namespace part of a name (`<namespace>/<name>`).
NAMESPACE_PATTERN = re.compile(r"^[a-zA-Z0-9.-]+$")
# server.json limits: the description is 1-100 characters, the version at most 255.
MAX_DESCRIPTION = 100
UNVERSIONED = "0.0.0"


class RegistrySettings(BaseModel):
    """How the gateway publishes its registry (the MCP Registry API at /v0.1)."""

    model_config = ConfigDict(extra="forbid")

    # The namespace of every published name (`<namespace>/<server>`); default: the public host's name
    # in reverse-DNS order (`gw.example.com` -> `com.example.gw`).
    namespace: str | None = Field(default=None, min_length=1, max_length=100)
    # A folder of server.json documents (agentgw/registry/folder.py), owned like the config file's
    # servers; relative to the config file. Unset: no folder.
    folder: Path | None = None
    # Tool pinning for servers that do not choose (agentgw/registry/pins.py): off, first-sight, approve.
    pinning: Literal["off", "first-sight", "approve"] = "off"

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not NAMESPACE_PATTERN.fullmatch(value):
            raise ValueError("registry.namespace: use letters, digits, dots and hyphens (reverse DNS)")
        return value


def default_namespace(base_url: str) -> str:
    """The reverse-DNS form of `base_url`'s host (an IP address as it is)."""
    host = (urlsplit(base_url).hostname or "localhost").lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = ".".join(reversed(host.split(".")))
    # An IPv6 address has colons, which a namespace may not: hyphens stand in for them.
    host = host.replace(":", "-")
    return host if NAMESPACE_PATTERN.fullmatch(host) else "localhost"


def server_json(spec: McpServerSpec, *, base_url: str, namespace: str) -> dict[str, object]:
    """The `server.json` document of `spec`, pointing at the gateway's endpoint for it."""
    description = spec.description or f"MCP server {spec.name}, served through the gateway"
    document: dict[str, object] = {
        "$schema": SCHEMA_URL,
        "name": f"{namespace}/{spec.name}",
        "description": description[:MAX_DESCRIPTION],
        "version": spec.version or UNVERSIONED,
        "remotes": [{"type": "streamable-http", "url": f"{base_url.rstrip('/')}/mcp/{spec.name}"}],
    }
    if spec.title:
        document["title"] = spec.title
    return document


def spec_digest(spec: McpServerSpec) -> str:
    """A digest of everything the spec says: a new one means the entry was updated."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class CatalogRow(SQLModel, table=True):
    """When a registry entry was published and last changed (epoch seconds), and whether it is gone."""

    __tablename__ = "registry_catalog"

    name: str = SQLField(primary_key=True)
    digest: str
    # The version last published (a deleted entry is listed under it).
    version: str
    published_at: float
    updated_at: float
    deleted: bool = False


@dataclass(frozen=True)
class CatalogEntry:
    """One published entry: the server's spec (None once deleted), its version and its times."""

    name: str
    spec: McpServerSpec | None
    version: str
    published_at: float
    updated_at: float

    @property
    def status(self) -> str:
        return "active" if self.spec is not None else "deleted"


def rfc3339(epoch: float) -> str:
    """`epoch` as an RFC 3339 UTC time with microseconds."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Catalog:
    """The published entries, in memory, kept in step with the registry's snapshot.

    `sync` is given the servers the registry serves now; it records new, changed and removed ones
    (several gateway processes may sync at once: a row another process wrote first is taken as is).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._entries: dict[str, CatalogEntry] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[CatalogEntry]:
        """Every entry, deleted ones included, sorted by name."""
        return sorted(self._entries.values(), key=lambda e: e.name)

    def sync(self, servers: Iterable[McpServerSpec]) -> None:
        """Record the registry's servers now: new ones published, changed ones updated, missing
        ones deleted."""
        current = {spec.name: spec for spec in servers}
        with self._lock:
            for attempt in range(2):
                try:
                    self._entries = self._write(current)
                    return
                except IntegrityError:
                    # Another process inserted the same new name first: read its row and go again.
                    if attempt:
                        raise

    def _write(self, current: dict[str, McpServerSpec]) -> dict[str, CatalogEntry]:
        now = time.time()
        entries: dict[str, CatalogEntry] = {}
        with Session(self._engine) as session:
            rows = {row.name: row for row in session.exec(select(CatalogRow))}
            changed = False
            for name, spec in current.items():
                digest, version = spec_digest(spec), spec.version or UNVERSIONED
                row = rows.get(name)
                if row is None:
                    row = CatalogRow(
                        name=name, digest=digest, version=version, published_at=now, updated_at=now
                    )
                    session.add(row)
                    changed = True
                elif row.digest != digest or row.deleted:
                    row.digest, row.version, row.updated_at, row.deleted = digest, version, now, False
                    session.add(row)
                    changed = True
                entries[name] = CatalogEntry(name, spec, row.version, row.published_at, row.updated_at)
            for name, row in rows.items():
                if name in current:
                    continue
                if not row.deleted:
                    row.deleted, row.updated_at = True, now
                    session.add(row)
                    changed = True
                entries[name] = CatalogEntry(name, None, row.version, row.published_at, row.updated_at)
            if changed:
                session.commit()
        return entries
