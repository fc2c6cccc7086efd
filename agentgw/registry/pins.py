"""Pinning against rug pulls: a tool, prompt or resource template approved once keeps the definition
it was approved with.

The gateway records a digest of each approved definition (a tool's name, title, description, input and
output schema, annotations; a prompt's name, title, description, arguments; a resource template's
uriTemplate, name, title, description, mimeType, annotations). One an upstream lists later with another
definition is quarantined: hidden from its list and refused when called (tools/call, prompts/get, a
resources/read of a URI that only a quarantined template matches), with an error naming what changed,
until someone approves the new definition (`agentgw registry diff|approve`, or the admin API). A
server's mode:

- `off`: nothing is pinned (the default);
- `first-sight`: an item is approved the first time the gateway sees it; a later change quarantines it;
- `approve`: an item waits, hidden, until approved; a later change quarantines it.

Pins live in the database (every gateway process and the CLI share them) and in memory, re-read when
another process bumps the version row. The data plane only reads memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mcp import InvalidUriTemplate, UriTemplate
from mcp.shared.uri_template import DEFAULT_MAX_URI_LENGTH
from sqlalchemy import JSON, Column, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

__all__ = [
    "KINDS",
    "PINNED_FIELDS",
    "Pin",
    "PinGate",
    "PinKind",
    "PinRow",
    "PinState",
    "PinVersion",
    "PinningMode",
    "Pins",
    "digest",
]

log = logging.getLogger(__name__)

PinningMode = Literal["off", "first-sight", "approve"]
PinState = Literal["approved", "quarantined", "pending"]
PinKind = Literal["tool", "prompt", "template"]
# What an item is, for a model deciding whether to use it: a change to any of these is a new item.
PINNED_FIELDS: dict[str, tuple[str, ...]] = {
    "tool": ("name", "title", "description", "inputSchema", "outputSchema", "annotations"),
    "prompt": ("name", "title", "description", "arguments"),
    "template": ("uriTemplate", "name", "title", "description", "mimeType", "annotations"),
}
# The kind pinned for each list key of MCP (the key of the list in a */list result).
KINDS: dict[str, PinKind] = {"tools": "tool", "prompts": "prompt", "resourceTemplates": "template"}
_WORDS = {"tool": "tool", "prompt": "prompt", "template": "resource template"}
# A definition kept for review is capped: an upstream must not fill the database through it.
MAX_DEFINITION_BYTES = 64 * 1024


def pinned(item: Mapping[str, Any], kind: PinKind = "tool") -> dict[str, Any]:
    """The parts of a definition that are pinned."""
    return {k: item[k] for k in PINNED_FIELDS[kind] if item.get(k) is not None}


def digest(item: Mapping[str, Any], kind: PinKind = "tool") -> str:
    canonical = json.dumps(pinned(item, kind), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _kept(item: Mapping[str, Any], kind: PinKind) -> dict[str, Any]:
    definition = pinned(item, kind)
    if len(json.dumps(definition)) > MAX_DEFINITION_BYTES:
        return {"name": item.get("name"), "truncated": True}
    return definition


Matcher = Callable[[str], bool]


def _template(definition: Mapping[str, Any] | None, *, unsure: bool) -> Matcher:
    """Whether a URI matches a template's uriTemplate. `unsure`: the answer when the template cannot be
    parsed (or was too large to keep): True for a template that must be refused, False for an approved
    one, so an unreadable template never opens a read and always closes one."""
    template = definition.get("uriTemplate") if definition else None
    if isinstance(template, str):
        try:
            parsed = UriTemplate.parse(template)
        except InvalidUriTemplate:
            if unsure:
                # Anything under its literal head may be what it serves.
                head = template.split("{", 1)[0]
                return lambda uri: uri.startswith(head)
            return lambda uri: False
        if unsure:
            # The matcher gives up on a URI too long to scan: one that long is not let through.
            return lambda uri: len(uri) > DEFAULT_MAX_URI_LENGTH or parsed.match(uri) is not None
        return lambda uri: parsed.match(uri) is not None
    return lambda uri: unsure


class PinRow(SQLModel, table=True):
    """One tool, prompt or resource template of one server: the definition approved (if any) and the one
    seen last."""

    __tablename__ = "mcp_pin"

    server: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)  # PinKind
    name: str = Field(primary_key=True)
    state: str
    approved_digest: str | None = None
    approved: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    seen_digest: str
    seen: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    changed_at: float
    approved_by: str | None = None


class PinVersion(SQLModel, table=True):
    __tablename__ = "mcp_pin_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0


@dataclass(frozen=True)
class Pin:
    server: str
    kind: PinKind
    name: str
    state: PinState
    approved_digest: str | None
    approved: dict[str, Any] | None
    seen_digest: str
    seen: dict[str, Any]
    changed_at: float
    approved_by: str | None

    def changes(self) -> list[str]:
        """The pinned fields whose value differs between the approved and the seen definition."""
        if self.approved is None:
            return ["(never approved)"]
        changed = [f for f in PINNED_FIELDS[self.kind] if self.approved.get(f) != self.seen.get(f)]
        # Definitions too large to keep differ by digest only.
        return changed or ["definition"]

    def refusal(self) -> str | None:
        if self.state == "approved":
            return None
        what = f"{_WORDS[self.kind]} {self.name!r} of server {self.server!r}"
        if self.state == "pending":
            return f"{what} is waiting for approval"
        return (
            f"{what} is quarantined: its "
            f"{', '.join(self.changes())} changed since it was approved; an administrator must review "
            f"and approve the new definition (agentgw registry diff {self.server})"
        )


# Per server with a template not approved: the approved templates' matchers, and each other template's.
_Reads = dict[str, tuple[list[Matcher], list[tuple[Pin, Matcher]]]]


def _pin(row: PinRow) -> Pin:
    return Pin(
        row.server,
        row.kind,  # type: ignore[arg-type]  # only PinKind values are written
        row.name,
        row.state,  # type: ignore[arg-type]  # only PinState values are written
        row.approved_digest,
        row.approved,
        row.seen_digest,
        row.seen,
        row.changed_at,
        row.approved_by,
    )


class Pins:
    """The pins of every server, in memory, kept in step with the database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pins: dict[tuple[str, str, str], Pin] = {}
        self._reads: _Reads = {}
        self._version = -1
        self._lock = threading.Lock()
        self.refresh(force=True)

    # --- reads (data plane: memory only) ---
    def pins(self, server: str, kind: PinKind | None = None) -> list[Pin]:
        return sorted(
            (p for (s, k, _), p in self._pins.items() if s == server and kind in (None, k)),
            key=lambda p: (p.kind, p.name),
        )

    def waiting(self) -> list[Pin]:
        """Every quarantined or pending item, of every server."""
        return sorted(
            (p for p in self._pins.values() if p.state != "approved"),
            key=lambda p: (p.server, p.kind, p.name),
        )

    def refusal(self, server: str, name: str, kind: PinKind = "tool") -> str | None:
        """Why a use of `name` on `server` is refused (quarantined or waiting), None if it is not."""
        pin = self._pins.get((server, kind, name))
        return pin.refusal() if pin is not None else None

    def read_refusal(self, server: str, uri: str) -> str | None:
        """Why a resources/read of `uri` on `server` is refused: the URI matches a resource template that
        is quarantined or waiting, and no approved one. None on a server whose templates are all approved
        (the common case costs one dictionary lookup)."""
        screened = self._reads.get(server)
        if screened is None:
            return None
        approved, others = screened
        if any(matches(uri) for matches in approved):
            return None
        return next((pin.refusal() for pin, matches in others if matches(uri)), None)

    # --- the data plane sees a listing ---
    def screen(
        self, server: str, mode: PinningMode, items: Iterable[Mapping[str, Any]], kind: PinKind = "tool"
    ) -> set[str]:
        """Record what `server` lists now; return the names of the items to hide from callers.

        An item seen for the first time is approved (`first-sight`) or waits (`approve`); an item whose
        definition differs from the approved one is quarantined. Only changes touch the database.
        """
        if mode == "off":
            return set()
        hidden: set[str] = set()
        new: list[PinRow] = []
        for item in items:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            pin = self._pins.get((server, kind, name))
            seen = digest(item, kind)
            if pin is not None and pin.seen_digest == seen:
                if pin.state != "approved":
                    hidden.add(name)
                continue
            now = time.time()
            if pin is None:
                approve = mode == "first-sight"
                new.append(
                    PinRow(
                        server=server,
                        kind=kind,
                        name=name,
                        state="approved" if approve else "pending",
                        approved_digest=seen if approve else None,
                        approved=_kept(item, kind) if approve else None,
                        seen_digest=seen,
                        seen=_kept(item, kind),
                        changed_at=now,
                        approved_by="first sight" if approve else None,
                    )
                )
                if not approve:
                    hidden.add(name)
                continue
            # Seen before with another definition: back to the approved one, or quarantined.
            state = (
                "approved"
                if seen == pin.approved_digest
                else ("pending" if pin.approved is None else "quarantined")
            )
            row = PinRow(
                server=server,
                kind=kind,
                name=name,
                state=state,
                approved_digest=pin.approved_digest,
                approved=pin.approved,
                seen_digest=seen,
                seen=_kept(item, kind),
                changed_at=now,
                approved_by=pin.approved_by,
            )
            new.append(row)
            if state != "approved":
                hidden.add(name)
            if state == "quarantined":
                log.warning(
                    "upstream %s: %s %r quarantined, its %s changed since it was approved",
                    server,
                    _WORDS[kind],
                    name,
                    ", ".join(_pin(row).changes()),
                )
        if new:
            self._write(new)
        return hidden

    # --- review ---
    def approve(
        self, server: str, names: Iterable[str] = (), *, by: str, kind: PinKind | None = None
    ) -> list[str]:
        """Approve the definitions last seen of `names` (all waiting or quarantined items when empty) of
        one kind, or of every kind when `kind` is None; returns the names approved.

        Raises:
            KeyError: a name is not one the gateway has seen on `server`.
        """
        self.refresh()
        wanted = set(names)
        pins = self.pins(server, kind)
        if unknown := sorted(wanted - {p.name for p in pins}):
            what = _WORDS[kind] if kind else "tool, prompt or resource template"
            raise KeyError(f"server {server!r} has no {what} named {', '.join(map(repr, unknown))} seen yet")
        chosen = (
            [p for p in pins if p.name in wanted] if wanted else [p for p in pins if p.state != "approved"]
        )
        now = time.time()
        rows = [
            PinRow(
                server=server,
                kind=p.kind,
                name=p.name,
                state="approved",
                approved_digest=p.seen_digest,
                approved=p.seen,
                seen_digest=p.seen_digest,
                seen=p.seen,
                changed_at=now,
                approved_by=by,
            )
            for p in chosen
        ]
        self._write(rows)
        return [p.name for p in chosen]

    # --- storage ---
    def _write(self, rows: list[PinRow]) -> None:
        with self._lock:
            for attempt in range(2):
                try:
                    with Session(self._engine) as session:
                        for row in rows:
                            session.merge(row)
                        version = session.get(PinVersion, 1) or PinVersion()
                        version.version += 1
                        session.add(version)
                        session.commit()
                    break
                except IntegrityError:
                    # Another process inserted the same pin (or the version row) first: go again,
                    # now as an update of its row.
                    if attempt:
                        raise
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the pins if another process changed them; returns whether they were re-read."""
        with Session(self._engine) as session:
            row = session.get(PinVersion, 1)
            version = row.version if row else 0
            if version == self._version and not force:
                return False
            pins = {(r.server, r.kind, r.name): _pin(r) for r in session.exec(select(PinRow))}
        self._pins, self._reads, self._version = pins, _reads(pins.values()), version
        return True


def _either(a: Matcher, b: Matcher) -> Matcher:
    return lambda uri: a(uri) or b(uri)


def _reads(
    pins: Iterable[Pin],
) -> _Reads:
    """The templates a resources/read is checked against, for each server with one not approved."""
    templates = [p for p in pins if p.kind == "template"]
    out: _Reads = {}
    for pin in templates:
        if pin.state != "approved":
            # Both what it was approved as and what it is now: a read of either is the upstream's new
            # definition answering.
            seen, before = _template(pin.seen, unsure=True), _template(pin.approved, unsure=False)
            out.setdefault(pin.server, ([], []))[1].append((pin, _either(seen, before)))
    for pin in templates:
        if pin.state == "approved" and pin.server in out:
            out[pin.server][0].append(_template(pin.approved, unsure=False))
    return out


class PinGate:
    """What the data plane asks: which listed items to hide, and whether a use is refused, for a
    server under its pinning mode (`mode_of`: the server's own, else the gateway's)."""

    def __init__(self, pins: Pins, mode_of: Callable[[str], PinningMode]) -> None:
        self.pins = pins
        self._mode_of = mode_of

    def visible(self, server: str, key: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The items of a listing (`key`: the list's key in the result, say `tools`) callers may see."""
        kind = KINDS.get(key)
        if kind is None:
            return items
        mode = self._mode_of(server)
        hidden = self.pins.screen(server, mode, items, kind)
        if mode != "off" and kind == "template":
            # A template without a name cannot be pinned: fail closed.
            return [i for i in items if isinstance(i.get("name"), str) and i["name"] not in hidden]
        return [i for i in items if i.get("name") not in hidden]

    def refusal(self, server: str, method: str | None, params: Mapping[str, Any]) -> str | None:
        """Why the request `method` with `params` is refused, None if pinning lets it through."""
        if method == "completion/complete":
            # Completing a quarantined prompt's arguments runs its new definition too.
            ref = params.get("ref")
            if not isinstance(ref, Mapping) or ref.get("type") != "ref/prompt":
                return None
            method, params = "prompts/get", ref
        if method not in ("tools/call", "prompts/get", "resources/read") or self._mode_of(server) == "off":
            return None
        if method == "resources/read":
            uri = params.get("uri")
            return self.pins.read_refusal(server, uri) if isinstance(uri, str) else None
        name = params.get("name")
        if not isinstance(name, str):
            return None
        return self.pins.refusal(server, name, "tool" if method == "tools/call" else "prompt")
