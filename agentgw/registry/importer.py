"""`agentgw registry import`: server.json documents from files or from another registry's API.

Another registry is read through its `GET /v0.1/servers` pages, fetched through the SSRF guard
(agentgw/fetch_guard.py): the URL comes from whoever runs the command, or from a script, and must not
reach what only the gateway's host can reach unless `fetch_allow` says so. Each document becomes an
upstream (agentgw/registry/folder.py says how); one that cannot (packages only, a name that yields no
registry name) is reported and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from agentgw.fetch_guard import FetchGuard, FetchRefused
from agentgw.registry.folder import MAX_DOCUMENT_BYTES, spec_of_server_json
from agentgw.registry.models import McpServerSpec

__all__ = ["Imported", "from_path", "from_registry"]

# A registry page holds at most 100 entries of a few kilobytes each.
MAX_PAGE_BYTES = 8 * 1024 * 1024
MAX_PAGES = 1000
FETCH_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Imported:
    """One document read: the upstream it declares, or why it declares none."""

    source: str  # the document's name, or its file
    spec: McpServerSpec | None
    problem: str | None = None


def _documents(body: object) -> Iterator[object]:
    """The server.json documents of a file: one document, a list, or a registry API answer."""
    if isinstance(body, dict) and isinstance(body.get("servers"), list):
        for entry in body["servers"]:
            # An API answer wraps each document: {"server": {...}, "_meta": {...}}.
            yield entry.get("server", entry) if isinstance(entry, dict) else entry
    elif isinstance(body, dict) and "server" in body:
        yield body["server"]
    elif isinstance(body, list):
        yield from body
    else:
        yield body


def _read(source: str, document: object) -> Imported:
    name = document.get("name") if isinstance(document, dict) else None
    label = name if isinstance(name, str) and name else source
    try:
        return Imported(label, spec_of_server_json(document))
    except ValueError as exc:
        return Imported(label, None, str(exc))


def from_path(path: Path) -> list[Imported]:
    """The documents of a file, or of every `*.json` file of a folder.

    Raises:
        ValueError: a file is missing, too large or not JSON.
    """
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    out: list[Imported] = []
    for file in files:
        try:
            if file.stat().st_size > MAX_PAGE_BYTES:
                raise ValueError(f"{file}: larger than {MAX_PAGE_BYTES} bytes")
            body = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: {exc}") from exc
        out += [_read(str(file), document) for document in _documents(body)]
    return out


def _list_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("give the registry's base URL, without a query")
    path = parts.path.rstrip("/")
    if not path.endswith("/v0.1/servers"):
        path += "/v0.1/servers"
    return parts._replace(path=path).geturl()


async def from_registry(url: str, guard: FetchGuard, *, schemes: tuple[str, ...]) -> list[Imported]:
    """Every document another registry lists at `url` (its base URL, or its `/v0.1/servers`).

    Raises:
        ValueError: the URL is not a registry's, a page is not a registry answer, or the fetch was
            refused (the guard's reason).
    """
    base = _list_url(url)
    out: list[Imported] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        query = {"limit": "100"} | ({"cursor": cursor} if cursor else {})
        try:
            raw = await guard.get(
                f"{base}?{urlencode(query)}",
                max_bytes=MAX_PAGE_BYTES,
                timeout_s=FETCH_TIMEOUT_S,
                headers={"accept": "application/json"},
                schemes=schemes,
            )
        except FetchRefused as exc:
            raise ValueError(f"{base}: {exc}") from exc
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{base}: the answer is not JSON") from exc
        if not isinstance(body, dict) or not isinstance(body.get("servers"), list):
            raise ValueError(f"{base}: the answer is not a registry's server list")
        for document in _documents(body):
            if len(json.dumps(document)) > MAX_DOCUMENT_BYTES:
                out.append(Imported(base, None, f"a document larger than {MAX_DOCUMENT_BYTES} bytes"))
                continue
            out.append(_read(base, document))
        metadata = body.get("metadata")
        next_cursor = metadata.get("nextCursor") if isinstance(metadata, dict) else None
        if not next_cursor or not isinstance(next_cursor, str) or next_cursor == cursor:
            return out
        cursor = next_cursor
    raise ValueError(f"{base}: more than {MAX_PAGES} pages")
