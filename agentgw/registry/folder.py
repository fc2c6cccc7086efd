"""The registry as files: a folder of `server.json` documents, each one upstream MCP server.

A document is the MCP Registry's `server.json` (the schema's own fields say what the server is and
where it answers: `remotes[0]`), plus agentgw's fields under `_meta["dev.agentgw/upstream"]`, the
extension slot the schema reserves for reverse-DNS keys. Those fields are the ones of a server in the
config file (`McpServerSpec`): `name` (the gateway's short name; default: the document's name after the
slash, lower-cased), `credential` (a secret declared in the config file, by name), `scopes` (required of
callers), `pinning`, `enabled`, `timeout_s`, `limits`, and for a stdio server `transport`, `command`,
`args`. The upstream's URL is the document's remote; the gateway publishes its own URL instead
(agentgw/registry/catalog.py).

The folder is the config file's: the gateway owns its servers as it owns the file's, reads it at start
and again whenever a file in it changes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from agentgw.errors import ConfigError
from agentgw.registry.models import McpServerSpec

__all__ = [
    "EXTENSION",
    "MAX_DOCUMENT_BYTES",
    "RegistryFolder",
    "spec_of_server_json",
    "to_server_json",
    "watch",
]

log = logging.getLogger(__name__)

EXTENSION = "dev.agentgw/upstream"
# A server.json is a few kilobytes; a larger file in the folder is a mistake, not a server.
MAX_DOCUMENT_BYTES = 256 * 1024
# Fields of the document itself that become the spec's (the rest are the registry's business).
_PUBLISHED = ("title", "description", "version")
_NOT_NAME = re.compile(r"[^a-z0-9-]+")


def _short_name(name: str) -> str:
    """A registry name from a server.json name (`io.github.acme/Weather_API` -> `weather-api`)."""
    tail = name.rpartition("/")[2].lower()
    short = _NOT_NAME.sub("-", tail).strip("-")
    while "--" in short:
        short = short.replace("--", "-")
    return short[:63].strip("-")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def spec_of_server_json(document: object) -> McpServerSpec:
    """The upstream a server.json document declares.

    Raises:
        ValueError: not a server.json the gateway can run (no remote and no stdio command in the
            extension, a name that yields no registry name, a field the spec refuses).
    """
    if not isinstance(document, dict):
        raise ValueError("a server.json document is a JSON object")
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("`name` is missing")
    meta = document.get("_meta") or {}
    ext = meta.get(EXTENSION, {}) if isinstance(meta, dict) else {}
    if not isinstance(ext, dict):
        raise ValueError(f"`_meta.{EXTENSION}` must be an object")
    fields: dict[str, Any] = {k: document[k] for k in _PUBLISHED if isinstance(document.get(k), str)}
    fields["name"] = _short_name(name)
    remotes = document.get("remotes") or []
    if remotes and ext.get("transport") != "stdio":
        remote = remotes[0]
        if not isinstance(remote, dict) or remote.get("type") not in ("streamable-http", "sse"):
            raise ValueError("`remotes[0]` must be a streamable-http or sse remote")
        fields["transport"], fields["url"] = remote["type"], remote.get("url")
    elif ext.get("transport") != "stdio":
        # Packages are for clients to install; the gateway runs a command only when told which.
        raise ValueError(f"no remote: give `remotes`, or a stdio `command` under `_meta.{EXTENSION}`")
    fields.update(ext)
    try:
        return McpServerSpec.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from exc


def to_server_json(spec: McpServerSpec, document_name: str) -> dict[str, object]:
    """The folder document that declares `spec` (its upstream and agentgw's fields)."""
    document: dict[str, object] = {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": document_name,
        "description": spec.description or f"MCP server {spec.name}",
        "version": spec.version or "0.0.0",
    }
    if spec.title:
        document["title"] = spec.title
    ext = spec.model_dump(mode="json", exclude_defaults=True, exclude={"title", "description", "version"})
    if spec.url:
        document["remotes"] = [{"type": spec.transport, "url": spec.url}]
        ext.pop("url", None)
        ext.pop("transport", None)
    if _short_name(document_name) == spec.name:
        ext.pop("name", None)
    else:
        ext["name"] = spec.name
    if ext:
        document["_meta"] = {EXTENSION: ext}
    return document


def _fingerprint(files: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed between the listing and now: the next look sees it
            continue
        out.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class RegistryFolder:
    """The `*.json` files of one folder (not its subfolders; hidden files skipped), read as servers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[tuple[str, int, int], ...] | None = None

    def _files(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*.json") if not p.name.startswith(".") and p.is_file())

    def changed(self) -> bool:
        """Whether a file was added, removed or written since the last `load`."""
        return _fingerprint(self._files()) != self._seen

    def load(self) -> list[McpServerSpec]:
        """Every server of the folder.

        Raises:
            ConfigError: the folder is missing, or a file is not a server.json the gateway can run (the
                message names the file); two files declare the same name.
        """
        if not self.path.is_dir():
            raise ConfigError(f"registry.folder {self.path}: not a directory")
        files = self._files()
        fingerprint = _fingerprint(files)
        servers: dict[str, tuple[McpServerSpec, str]] = {}
        for path in files:
            if path.stat().st_size > MAX_DOCUMENT_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes: not a server.json")
            try:
                spec = spec_of_server_json(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
            if spec.name in servers:
                raise ConfigError(f"{path}: server {spec.name!r} is declared in {servers[spec.name][1]} too")
            servers[spec.name] = (spec, path.name)
        self._seen = fingerprint
        return [spec for spec, _ in servers.values()]


async def watch(
    folder: RegistryFolder, apply: Callable[[list[McpServerSpec]], None], interval_s: float
) -> None:
    """Read `folder` again whenever a file in it changes, and `apply` its servers.

    A folder that no longer reads (a bad file, a name declared twice) or that `apply` refuses is
    reported and the registry keeps what it served: a typo in one file never empties the registry.
    """
    while True:
        await anyio.sleep(interval_s)
        try:
            if not await anyio.to_thread.run_sync(folder.changed):
                continue
            servers = await anyio.to_thread.run_sync(folder.load)
            await anyio.to_thread.run_sync(apply, servers)
            log.info("registry folder %s: reloaded, %d servers", folder.path, len(servers))
        except (ConfigError, ValueError) as exc:
            log.error("registry folder %s not applied, the registry is unchanged: %s", folder.path, exc)
        except Exception:
            log.exception("registry folder %s: reload failed; the registry is unchanged", folder.path)
