"""`verify`: walk every hash chain, hold it to its signed checkpoints and to the journal, and report
the first record that was edited, removed or inserted.

The chains prove the order and content of the records to whoever cannot rewrite them; the signed
checkpoints (`checkpoints.py`) prove them to whoever can write the database but lacks the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import Engine, select

from agentgw.storage.audit.chain import audit_chain, audit_checkpoint, audit_log, record_hash
from agentgw.storage.audit.checkpoints import Checkpoint, CheckpointTrust, parse_checkpoint, read_sink
from agentgw.storage.audit.journal import journal_directory, segments

__all__ = ["Problem", "ProblemKind", "VerifyReport", "verify"]

# forged: a checkpoint not signed by a trusted key; unreadable: a file `verify` must read cannot be,
# or one a journal replay gave up on is left.
ProblemKind = Literal["edited", "removed", "inserted", "forged", "unreadable"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with the log."""

    kind: ProblemKind
    chain: str  # "" when no chain is named
    record_id: int | None  # the record named; None when records at a chain's end are gone
    seq: int | None
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    records: int
    chains: int
    problem: Problem | None
    checkpoints: int = 0  # checkpoint signatures checked (a sink's line and its database copy: two)
    unproven: int = 0  # records after their chain's newest checkpoint: the window no signature covers
    pending: int = 0  # records only in a journal so far (a live gateway ingests them within moments)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(engine: Engine, trust: CheckpointTrust | None = None) -> VerifyReport:
    """Walk every chain and report the first record that was edited, removed or inserted.

    With `trust` the chains are also held to every checkpoint signed by a trusted key, from its sinks
    and the database (decision 0215): recomputed hashes, a truncated tail with its head moved back, a
    chain deleted with its head, the oldest records removed without a signed prune are found, up to
    the newest checkpoint of each chain. A SQLite database's journal is checked as well: its lines
    must match their hashes and the database, and a file a replay gave up on (`*.unreadable`) fails.

    Reads checkpoints first, then the journal, then the chains: a live gateway only adds to what was
    read before, so nothing it checkpointed can be missed in between.
    """
    signed: dict[str, _Claims] = {}
    problem, missing_sink = _read_checkpoints(engine, trust, signed) if trust is not None else (None, None)
    journaled: dict[str, dict[int, str]] = {}
    directory = journal_directory(engine)
    if problem is None and directory is not None:
        problem = _read_journals(directory, journaled)
    # What a record's hash must be, and who says so: the chain's newest checkpoint, its journal line.
    expected: dict[str, dict[int, list[tuple[str, str]]]] = {}
    for chain, lines in journaled.items():
        expected[chain] = {seq: [(hash_, "its line in the journal")] for seq, hash_ in lines.items()}
    for chain, claims in signed.items():
        for c in [claims.newest, *claims.rivals] if claims.newest is not None else ():
            expected.setdefault(chain, {}).setdefault(c.seq, []).append(
                (c.hash, f"the checkpoint signed at {c.time}")
            )
    with engine.connect() as conn:
        heads = {r.chain: r for r in conn.execute(select(audit_chain))}
        if problem is not None:
            return VerifyReport(0, len(heads), problem)
        rows = conn.execution_options(yield_per=1000).execute(
            select(audit_log).order_by(audit_log.c.chain, audit_log.c.seq, audit_log.c.id)
        )
        try:
            checked, seen, problem = _walk((r._mapping for r in rows), heads, expected)
        finally:
            rows.close()  # stopping at the first problem leaves a server-side cursor open otherwise
    if problem is None:
        for chain, head in heads.items():
            if chain not in seen and head.head_seq > head.anchor_seq:
                span = f"seq {head.anchor_seq + 1} to {head.head_seq}"
                message = f"every record of chain {chain!r} ({span}) was removed"
                problem = Problem("removed", chain, None, head.anchor_seq + 1, message)
                break
    if problem is None and missing_sink is not None and signed:
        # A gateway that signs checkpoints creates its sink at start; missing, it was removed (or
        # this is another host: pass the sinks to read).
        problem = Problem("unreadable", "", None, None, f"the checkpoint sink {missing_sink} is missing")
    pending = sum(
        sum(1 for seq in lines if chain not in heads or seq > heads[chain].head_seq)
        for chain, lines in journaled.items()
    )
    unproven = 0
    if trust is not None:
        held, unproven = _held_to_checkpoints(heads, signed, journaled)
        problem = problem or held
    count = sum(c.count for c in signed.values())
    return VerifyReport(checked, len(heads), problem, count, unproven, pending)


@dataclass(slots=True)
class _Claims:
    """What the trusted checkpoints of one chain say, kept to what `verify` needs, so that its memory
    does not grow with them: the chain links every earlier record to the newest checkpoint's."""

    newest: Checkpoint | None = None  # the head checkpoint of the highest seq
    rivals: list[Checkpoint] = field(default_factory=list)  # of the same seq, another hash: a lie
    final: Checkpoint | None = None  # the final checkpoint of the lowest seq
    anchors: set[tuple[int, str]] = field(default_factory=set)  # (seq, hash) of the signed anchors
    count: int = 0

    def add(self, c: Checkpoint) -> None:
        self.count += 1
        if c.kind == "anchor":
            self.anchors.add((c.seq, c.hash))
            return
        if self.newest is None or c.seq > self.newest.seq:
            self.newest, self.rivals = c, []
        elif c.seq == self.newest.seq and c.hash != self.newest.hash and len(self.rivals) < 8:
            self.rivals.append(c)
        if c.last and (self.final is None or c.seq < self.final.seq):
            self.final = c


def _read_checkpoints(
    engine: Engine, trust: CheckpointTrust, signed: dict[str, _Claims]
) -> tuple[Problem | None, Path | None]:
    """Collect the checkpoints of the sinks and the database into `signed`; the first problem, and
    a sink that does not exist (a problem if there are checkpoints at all)."""
    missing: Path | None = None
    for sink in trust.sinks:
        try:
            for checkpoint in read_sink(sink, trust.keys):
                signed.setdefault(checkpoint.chain, _Claims()).add(checkpoint)
        except FileNotFoundError:
            missing = missing or sink
        except OSError as exc:
            return Problem(
                "unreadable", "", None, None, f"the checkpoint sink {sink} cannot be read: {exc}"
            ), None
        except ValueError as exc:
            return Problem("forged", "", None, None, str(exc)), None
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(
            select(audit_checkpoint).order_by(audit_checkpoint.c.id)
        )
        for row in rows:
            try:
                checkpoint = parse_checkpoint(row.body, trust.keys)
            except ValueError as exc:
                rows.close()
                where = f"checkpoint {row.id} in the database (chain {row.chain!r}, seq {row.seq})"
                return Problem(
                    "forged", row.chain, None, row.seq, f"{where} is not to be trusted: {exc}"
                ), None
            signed.setdefault(checkpoint.chain, _Claims()).add(checkpoint)
    return None, missing


def _read_journals(directory: Path, journaled: dict[str, dict[int, str]]) -> Problem | None:
    """Read every journal segment in `directory` into `journaled` (chain -> seq -> hash); the first
    line that does not match its hash or its predecessor, or a file a replay gave up on."""
    try:
        names = sorted(path.name for path in directory.iterdir())
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Problem("unreadable", "", None, None, f"the journal {directory} cannot be read: {exc}")
    for name in names:
        if name.endswith(".unreadable"):
            why = "a journal replay stopped there, and the records after that point are not in the database"
            return Problem(
                "unreadable", "", None, None, f"{directory / name} is left: {why} (see the gateway's log)"
            )
    for chain_id in sorted({name.split(".")[0] for name in names if name.endswith(".jsonl")}):
        previous: tuple[int, str] | None = None
        for path in segments(directory, chain_id):
            try:
                lines = path.read_bytes().split(b"\n")
            except FileNotFoundError:  # ingested and deleted meanwhile: the next one starts later
                previous = None
                continue
            except OSError as exc:
                return Problem(
                    "unreadable", "", None, None, f"the journal segment {path} cannot be read: {exc}"
                )
            lines.pop()  # b"" after the last newline, or a write still under way
            for number, line in enumerate(lines, 1):
                where = f"line {number} of the journal segment {path}"
                try:
                    row = orjson.loads(line)
                    chain, seq, prev_hash, hash_ = row["chain"], row["seq"], row["prev_hash"], row["hash"]
                    edited = record_hash(row) != hash_
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    return Problem("edited", "", None, None, f"{where} is not a record: it was edited")
                if edited:
                    why = "was edited: its content does not match its hash"
                    return Problem("edited", chain, None, seq, f"{where} (chain {chain!r}, seq {seq}) {why}")
                if previous is not None and seq > previous[0] + 1:
                    why = f"seq {previous[0] + 1} to {seq - 1} of chain {chain!r} were removed before it"
                    return Problem("removed", chain, None, previous[0] + 1, f"{where}: {why}")
                if previous is not None and (seq != previous[0] + 1 or prev_hash != previous[1]):
                    why = "does not follow from its predecessor's hash: it was edited or inserted"
                    return Problem("edited", chain, None, seq, f"{where} (chain {chain!r}, seq {seq}) {why}")
                journaled.setdefault(chain, {})[seq] = hash_
                previous = (seq, hash_)
    return None


def _held_to_checkpoints(
    heads: Mapping[str, Any], signed: Mapping[str, _Claims], journaled: Mapping[str, Mapping[int, str]]
) -> tuple[Problem | None, int]:
    """What the records walk cannot see: checkpointed records gone from the database and the
    journal, chains gone with their head, anchors nobody signed, records after a final checkpoint.
    Returns the first problem and how many records no checkpoint covers yet."""
    unproven = 0
    for chain, head in heads.items():
        claims = signed.get(chain, _Claims())
        lines = journaled.get(chain, {})
        if head.anchor_seq > 0 and (head.anchor_seq, head.anchor_hash) not in claims.anchors:
            why = f"no anchor signed by a trusted key vouches for seq {head.anchor_seq}"
            message = f"the oldest records of chain {chain!r} (to seq {head.anchor_seq}) were removed: {why}"
            return Problem("removed", chain, None, head.anchor_seq, message), unproven
        reach = head.head_seq  # the database's head, and after it what the journal still holds
        while reach + 1 in lines:
            reach += 1
        newest = claims.newest if claims.newest is not None and claims.newest.seq > head.anchor_seq else None
        if newest is not None and newest.seq > reach:
            why = f"a checkpoint signed at {newest.time} vouches for seq {newest.seq}"
            message = (
                f"the newest record(s) of chain {chain!r} (seq {reach + 1} to {newest.seq}) were removed, "
                f"from the database and the journal, and its head moved back: {why}"
            )
            return Problem("removed", chain, None, reach + 1, message), unproven
        if newest is not None and newest.seq > head.head_seq and lines[newest.seq] != newest.hash:
            message = (
                f"seq {newest.seq} of chain {chain!r} in the journal is not the one signed at {newest.time}"
            )
            return Problem("edited", chain, None, newest.seq, message), unproven
        final = claims.final
        if final is not None and head.head_seq > final.seq:
            message = (
                f"records seq {final.seq + 1} to {head.head_seq} of chain {chain!r} were inserted "
                f"after its final checkpoint (seq {final.seq})"
            )
            return Problem("inserted", chain, None, final.seq + 1, message), unproven
        if final is None:
            unproven += head.head_seq - max(head.anchor_seq, newest.seq if newest is not None else 0)
    for chain, claims in sorted(signed.items()):
        if chain in heads:
            continue
        c = claims.newest
        if claims.anchors or (c is not None and journaled.get(chain, {}).get(c.seq) != c.hash):
            vouched = (
                f"a checkpoint signed at {c.time} vouches for its records up to seq {c.seq}"
                if c
                else "it was pruned"
            )
            message = f"chain {chain!r} was removed, its head included: {vouched}"
            return Problem("removed", chain, None, None, message), unproven
    return None, unproven


def _walk(
    rows: Iterator[Mapping[Any, Any]],
    heads: Mapping[str, Any],
    expected: Mapping[str, Mapping[int, list[tuple[str, str]]]],
) -> tuple[int, set[str], Problem | None]:
    checked = 0
    seen: set[str] = set()
    state: tuple[str, int, str] | None = None  # chain, expected seq, previous hash
    for row in rows:
        chain = row["chain"]
        if state is None or state[0] != chain:
            if state is not None and (problem := _tail(heads[state[0]], state[1] - 1)) is not None:
                return checked, seen, problem
            head = heads.get(chain)
            if head is None:
                return checked, seen, _problem("inserted", row, f"chain {chain!r} was never started")
            seen.add(chain)
            state = (chain, head.anchor_seq + 1, head.anchor_hash)
        problem = _check(row, heads[chain], state[1], state[2])
        if problem is not None:
            return checked, seen, problem
        known = expected.get(chain)
        for hash_, source in known.get(row["seq"], ()) if known is not None else ():
            if hash_ != row["hash"]:
                why = f"its hash is not the one {source} holds: the chain was rewritten from here on"
                return checked, seen, _problem("edited", row, why)
        checked += 1
        state = (chain, row["seq"] + 1, row["hash"])
    if state is not None and (problem := _tail(heads[state[0]], state[1] - 1)) is not None:
        return checked, seen, problem
    return checked, seen, None


def _problem(kind: ProblemKind, row: Mapping[Any, Any], why: str) -> Problem:
    message = f"record {row['id']} (chain {row['chain']!r}, seq {row['seq']}) was {kind}: {why}"
    return Problem(kind, row["chain"], row["id"], row["seq"], message)


def _check(row: Mapping[Any, Any], head: Any, expected: int, prev_hash: str) -> Problem | None:
    seq = row["seq"]
    if seq > head.head_seq:
        return _problem("inserted", row, f"it lies beyond the chain's recorded head (seq {head.head_seq})")
    if seq < expected:
        return _problem("inserted", row, "its position in the chain was already taken or pruned")
    if record_hash(row) != row["hash"]:
        return _problem("edited", row, "its content does not match its hash")
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
        return Problem(
            "removed",
            row["chain"],
            row["id"],
            seq,
            f"record(s) {missing} of chain {row['chain']!r}, before record {row['id']}, were removed",
        )
    if row["prev_hash"] != prev_hash:
        return _problem("inserted", row, "it does not follow from its predecessor's hash")
    return None


def _tail(head: Any, last_seq: int) -> Problem | None:
    if last_seq < head.head_seq:
        missing = (
            f"seq {last_seq + 1}"
            if head.head_seq == last_seq + 1
            else f"seq {last_seq + 1} to {head.head_seq}"
        )
        return Problem(
            "removed",
            head.chain,
            None,
            last_seq + 1,
            f"the newest record(s) of chain {head.chain!r} ({missing}) were removed",
        )
    return None
