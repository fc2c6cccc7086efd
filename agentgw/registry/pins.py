"""Tool pinning against rug pulls: a tool approved once keeps the definition it was approved with.

The gateway records a digest of each approved tool's definition (name, title, description, input and
output schema, annotations). A tool an upstream lists later with another definition is quarantined:
hidden from tools/list and refused at tools/call, with an error naming what changed, until someone
approves the new definition (`agentgw registry diff|approve`, or the admin API). A server's mode:

- `off`: nothing is pinned (the default);
- `first-sight`: a tool is approved the first time the gateway sees it; a later change quarantines it;
- `approve`: a tool waits, hidden, until approved; a later change quarantines it.

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

from sqlalchemy import JSON, Column, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

__all__ = [
    "PINNED_FIELDS",
    "Pin",
    "PinGate",
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
# What a tool is, for a model deciding whether to call it: a change to any of these is a new tool.
PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
# A definition kept for review is capped: an upstream must not fill the database through it.
MAX_DEFINITION_BYTES = 64 * 1024


def pinned(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a tool definition that are pinned."""
    return {k: tool[k] for k in PINNED_FIELDS if tool.get(k) is not None}


def digest(tool: Mapping[str, Any]) -> str:
    canonical = json.dumps(pinned(tool), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _kept(tool: Mapping[str, Any]) -> dict[str, Any]:
    definition = pinned(tool)
    if len(json.dumps(definition)) > MAX_DEFINITION_BYTES:
        return {"name": tool.get("name"), "truncated": True}
    return definition


class PinRow(SQLModel, table=True):
    """One tool of one server: the definition approved (if any) and the one seen last."""

    __tablename__ = "tool_pin"

    server: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    state: str
    approved_digest: str | None = None
    approved: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    seen_digest: str
    seen: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    changed_at: float
    approved_by: str | None = None


class PinVersion(SQLModel, table=True):
    __tablename__ = "tool_pin_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0


@dataclass(frozen=True)
class Pin:
    server: str
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
        changed = [f for f in PINNED_FIELDS if self.approved.get(f) != self.seen.get(f)]
        # Definitions too large to keep differ by digest only.
        return changed or ["definition"]

    def refusal(self) -> str | None:
        if self.state == "approved":
            return None
        if self.state == "pending":
            return f"tool {self.name!r} of server {self.server!r} is waiting for approval"
        return (
            f"tool {self.name!r} of server {self.server!r} is quarantined: its "
            f"{', '.join(self.changes())} changed since it was approved; an administrator must review "
            f"and approve the new definition (agentgw registry diff {self.server})"
        )


def _pin(row: PinRow) -> Pin:
    return Pin(
        row.server,
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
        self._pins: dict[tuple[str, str], Pin] = {}
        self._version = -1
        self._lock = threading.Lock()
        self.refresh(force=True)

    # --- reads (data plane: memory only) ---
    def pins(self, server: str) -> list[Pin]:
        return sorted((p for (s, _), p in self._pins.items() if s == server), key=lambda p: p.name)

    def waiting(self) -> list[Pin]:
        """Every quarantined or pending tool, of every server."""
        return sorted(
            (p for p in self._pins.values() if p.state != "approved"), key=lambda p: (p.server, p.name)
        )

    def refusal(self, server: str, tool: str) -> str | None:
        """Why a call of `tool` on `server` is refused (quarantined or waiting), None if it is not."""
        pin = self._pins.get((server, tool))
        return pin.refusal() if pin is not None else None

    # --- the data plane sees a listing ---
    def screen(self, server: str, mode: PinningMode, tools: Iterable[Mapping[str, Any]]) -> set[str]:
        """Record what `server` lists now; return the names of the tools to hide from callers.

        A tool seen for the first time is approved (`first-sight`) or waits (`approve`); a tool whose
        definition differs from the approved one is quarantined. Only changes touch the database.
        """
        if mode == "off":
            return set()
        hidden: set[str] = set()
        new: list[PinRow] = []
        for tool in tools:
            name = tool.get("name")
            if not isinstance(name, str):
                continue
            pin = self._pins.get((server, name))
            seen = digest(tool)
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
                        name=name,
                        state="approved" if approve else "pending",
                        approved_digest=seen if approve else None,
                        approved=_kept(tool) if approve else None,
                        seen_digest=seen,
                        seen=_kept(tool),
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
                name=name,
                state=state,
                approved_digest=pin.approved_digest,
                approved=pin.approved,
                seen_digest=seen,
                seen=_kept(tool),
                changed_at=now,
                approved_by=pin.approved_by,
            )
            new.append(row)
            if state != "approved":
                hidden.add(name)
            if state == "quarantined":
                log.warning(
                    "upstream %s: tool %r quarantined, its %s changed since it was approved",
                    server,
                    name,
                    ", ".join(_pin(row).changes()),
                )
        if new:
            self._write(new)
        return hidden

    # --- review ---
    def approve(self, server: str, names: Iterable[str] = (), *, by: str) -> list[str]:
        """Approve the definitions last seen of `names` (all waiting or quarantined tools when empty);
        returns the names approved.

        Raises:
            KeyError: a name is not a tool the gateway has seen on `server`.
        """
        self.refresh()
        wanted = set(names)
        pins = {p.name: p for p in self.pins(server)}
        if unknown := sorted(wanted - pins.keys()):
            raise KeyError(f"server {server!r} has no tool named {', '.join(map(repr, unknown))} seen yet")
        chosen = (
            [pins[n] for n in sorted(wanted)]
            if wanted
            else [p for p in pins.values() if p.state != "approved"]
        )
        now = time.time()
        rows = [
            PinRow(
                server=server,
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
            pins = {(r.server, r.name): _pin(r) for r in session.exec(select(PinRow))}
        self._pins, self._version = pins, version
        return True


class PinGate:
    """What the data plane asks: which listed tools to hide, and whether a call is refused, for a
    server under its pinning mode (`mode_of`: the server's own, else the gateway's)."""

    def __init__(self, pins: Pins, mode_of: Callable[[str], PinningMode]) -> None:
        self.pins = pins
        self._mode_of = mode_of

    def hidden(self, server: str, tools: Iterable[Mapping[str, Any]]) -> set[str]:
        return self.pins.screen(server, self._mode_of(server), tools)

    def refusal(self, server: str, tool: object) -> str | None:
        if self._mode_of(server) == "off" or not isinstance(tool, str):
            return None
        return self.pins.refusal(server, tool)
