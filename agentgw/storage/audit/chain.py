"""The stored form of the audit log: its tables, and the hash chain every record takes a place in.

Chains: every gateway process appends to its own chain, named `<node>:<random>` at start-up, so
several processes (on one machine or many) can write one table without coordinating. Each record
holds its chain, its position `seq` (1, 2, ...), the hash of its predecessor in the chain and its
own hash: SHA-256 over the canonical JSON of all its columns but `id` and `hash`. The
`audit_chain` table holds each chain's head (last seq and hash), updated in the same transaction
as the records, so that removing the newest records is detected too; retention moves a chain's
anchor (the last removed record) forward so that a pruned chain still verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect

from agentgw.records.audit import AuditRecord
from agentgw.storage.audit.checkpoints import Checkpoint

__all__ = [
    "GENESIS",
    "HASHED",
    "audit_chain",
    "audit_checkpoint",
    "audit_log",
    "chain_row",
    "checkpoint_row",
    "create_audit_tables",
    "metadata",
    "record_hash",
]

GENESIS = "0" * 64

# Core tables on their own metadata: the log is often a database of its own (`audit.database_url`).
metadata = MetaData()
audit_log = Table(
    "audit_log",
    metadata,
    # BIGINT on PostgreSQL; SQLite auto-increments only an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("chain", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("time", String(32), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("request_id", String(64), nullable=False, index=True),
    Column("trace_id", String(64)),
    Column("run_id", String(128), index=True),
    Column("session_id", String(256)),
    Column("subject", String(512), index=True),
    Column("client_id", String(512)),
    Column("roles", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("actors", Text, nullable=False),
    # How the upstream was credentialed, and the delegation chain its token carries.
    Column("credential_mode", String(32)),
    Column("upstream_actors", Text, nullable=False, server_default="[]"),
    Column("protocol", String(16), nullable=False),
    Column("action", String(16), nullable=False),
    Column("resource", Text, nullable=False),
    Column("method", String(256), nullable=False),
    Column("upstream", String(256), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("reason", String(64)),
    Column("rule", Text),
    Column("detail", Text),
    Column("status", String(64)),
    Column("latency_ms", Float),
    Column("tokens", BigInteger),
    Column("cost", Float),
    Column("args_digest", String(80)),
    Column("arguments", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("chain", "seq", name="uq_audit_log_chain_seq"),
)
audit_chain = Table(
    "audit_chain",
    metadata,
    Column("chain", String(200), primary_key=True),
    Column("node", String(200), nullable=False),
    Column("started_at", String(32), nullable=False),
    Column("head_seq", BigInteger, nullable=False),
    Column("head_hash", String(64), nullable=False),
    # Retention removed every record up to anchor_seq; the chain continues from anchor_hash.
    Column("anchor_seq", BigInteger, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
)
# Signed checkpoints and anchors (decision 0215), each stored as its whole signed line: `verify`
# checks every signature, so a row counts for what it says, not for being here.
audit_checkpoint = Table(
    "audit_checkpoint",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("chain", String(200), nullable=False, index=True),
    Column("seq", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
)
HASHED = tuple(
    str(c.name) for c in audit_log.columns if c.name not in ("id", "hash")
)  # orjson keys must be str


def create_audit_tables(engine: Engine) -> None:
    """Create the audit tables if they are missing (idempotent)."""
    metadata.create_all(engine)


def record_hash(row: Mapping[Any, Any]) -> str:
    """The hash of a stored record: SHA-256 over the canonical JSON of every column but id and hash."""
    content = {name: row[name] for name in HASHED}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def chain_row(chain: str, node: str, started_at: str) -> dict[str, Any]:
    """The `audit_chain` row of a chain that has no record yet."""
    return {
        "chain": chain,
        "node": node,
        "started_at": started_at,
        "head_seq": 0,
        "head_hash": GENESIS,
        "anchor_seq": 0,
        "anchor_hash": GENESIS,
    }


def checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"chain": checkpoint.chain, "seq": checkpoint.seq, "body": checkpoint.line().decode()}


def _json_list(values: tuple[str, ...]) -> str:
    return orjson.dumps(values).decode() if values else "[]"  # a tuple is a JSON array, as a list is


def stored_row(record: AuditRecord, chain: str, seq: int, prev_hash: str) -> dict[str, Any]:
    """The stored row of `record` at `seq` of `chain`, but its hash.

    Every hashed column, written out in sorted order: the row's plain JSON is then the canonical JSON
    `record_hash` hashes, without a copy and a sort per record (`test_a_stored_row_is_in_hash_order`).
    """
    return {
        "action": record.action,
        "actors": _json_list(record.actors),
        "args_digest": record.args_digest,
        "arguments": record.arguments,
        "chain": chain,
        "client_id": record.client_id,
        "cost": record.cost,
        "credential_mode": record.credential_mode,
        "decision": record.decision,
        "detail": record.detail,
        "event": record.event,
        "latency_ms": record.latency_ms,
        "method": record.method,
        "prev_hash": prev_hash,
        "protocol": record.protocol,
        "reason": record.reason,
        "request_id": record.request_id,
        "resource": record.resource,
        "roles": _json_list(record.roles),
        "rule": record.rule,
        "run_id": record.run_id,
        "scopes": _json_list(record.scopes),
        "seq": seq,
        "session_id": record.session_id,
        "status": record.status,
        "subject": record.subject,
        "time": record.time,
        "tokens": record.tokens,
        "trace_id": record.trace_id,
        "upstream": record.upstream,
        "upstream_actors": _json_list(record.upstream_actors),
    }


# The statements of the writers that use the driver's own sqlite3 connection (the journal's ingest
# and replay), compiled by SQLAlchemy for SQLite once.
INSERT_COLUMNS = tuple(str(c.name) for c in audit_log.columns if c.name != "id")
_CHAIN_COLUMNS = tuple(str(c.name) for c in audit_chain.columns)


def _named(table: Table, columns: Sequence[str]) -> str:
    # `INSERT INTO t (a, b) VALUES (:a, :b)`.
    dialect = sqlite_dialect.dialect(paramstyle="named")
    return str(insert(table).compile(dialect=dialect, column_keys=list(columns)))


INSERT_SQL = _named(audit_log, INSERT_COLUMNS)
CHAIN_SQL = _named(audit_chain, _CHAIN_COLUMNS)
CHECKPOINT_SQL = _named(audit_checkpoint, ("chain", "seq", "body"))
ADVANCE_SQL = "UPDATE audit_chain SET head_seq = ?, head_hash = ? WHERE chain = ?"
HEAD_SQL = "SELECT head_seq, head_hash FROM audit_chain WHERE chain = ?"
