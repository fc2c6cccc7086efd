"""The audit log in SQL: append-only, hash-chained, written by group commit; queries and `verify`.

One concept per module, from the bottom up:
- `checkpoints`: signed heads of the chains, and the key and sink they need.
- `chain`: the tables, and the hash chain every stored record takes a place in.
- `journal`: the journal files of a SQLite log, and their replay after a crash.
- `sink`: `SqlAuditLog`, the `AuditSink`: records queued on the event loop, chained, and handed to
  one of the two writers, `commit.CommitLog` (a thread commits while the waiters wait) or
  `ingest.JournalLog` (journaled on the loop, ingested by a thread), chosen at construction.
- `retention`, `query`, `export`, `verify`: what reads or prunes the stored log.
"""

from agentgw.storage.audit.chain import (
    GENESIS,
    HASHED,
    audit_chain,
    audit_checkpoint,
    audit_log,
    create_audit_tables,
    record_hash,
)
from agentgw.storage.audit.checkpoints import (
    KEY_FILE,
    SINK_FILE,
    Checkpoint,
    Checkpointer,
    CheckpointKey,
    CheckpointTrust,
    checkpointer,
    parse_checkpoint,
    public_text,
    read_sink,
    trust,
)
from agentgw.storage.audit.export import otel_record
from agentgw.storage.audit.journal import journal_directory, replay_journals
from agentgw.storage.audit.query import AuditQuery, iter_records, parse_time, query
from agentgw.storage.audit.retention import prune
from agentgw.storage.audit.sink import LINGER_S, SqlAuditLog
from agentgw.storage.audit.verify import Problem, VerifyReport, verify

__all__ = [
    "GENESIS",
    "HASHED",
    "KEY_FILE",
    "LINGER_S",
    "SINK_FILE",
    "AuditQuery",
    "Checkpoint",
    "CheckpointKey",
    "CheckpointTrust",
    "Checkpointer",
    "Problem",
    "SqlAuditLog",
    "VerifyReport",
    "audit_chain",
    "audit_checkpoint",
    "audit_log",
    "checkpointer",
    "create_audit_tables",
    "iter_records",
    "journal_directory",
    "otel_record",
    "parse_checkpoint",
    "parse_time",
    "prune",
    "public_text",
    "query",
    "read_sink",
    "record_hash",
    "replay_journals",
    "trust",
    "verify",
]
