"""Retention: delete the oldest records of every chain and move its anchor, so that it still verifies."""

from __future__ import annotations

from sqlalchemy import Engine, delete, insert, select, update

from agentgw.storage.audit.chain import audit_chain, audit_checkpoint, audit_log, checkpoint_row
from agentgw.storage.audit.checkpoints import Checkpointer

__all__ = ["prune"]


def prune(engine: Engine, before: str, checkpointer: Checkpointer | None = None) -> int:
    """Delete records older than `before` (a `timestamp`), moving each chain's anchor; returns how many.

    Records go in chain order up to the last one older than `before`, so that a chain never has a
    hole: what remains starts right after its anchor. The `checkpointer` signs each new anchor
    (into its sink before the database has it), without which `verify` holding the chains to their
    checkpoints finds the oldest records removed; checkpoints below the anchor are dropped.
    """
    removed = 0
    with engine.begin() as conn:
        chains = conn.execute(select(audit_chain.c.chain)).scalars().all()
        for chain in chains:
            last = conn.execute(
                select(audit_log.c.seq, audit_log.c.hash)
                .where(audit_log.c.chain == chain, audit_log.c.time < before)
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            ).first()
            if last is None:
                continue
            result = conn.execute(
                delete(audit_log).where(audit_log.c.chain == chain, audit_log.c.seq <= last.seq)
            )
            removed += result.rowcount
            if checkpointer is not None:
                anchor = checkpointer.sign("anchor", chain, last.seq, last.hash)
                conn.execute(insert(audit_checkpoint).values(**checkpoint_row(anchor)))
            conn.execute(
                delete(audit_checkpoint).where(
                    audit_checkpoint.c.chain == chain, audit_checkpoint.c.seq < last.seq
                )
            )
            conn.execute(
                update(audit_chain)
                .where(audit_chain.c.chain == chain, audit_chain.c.anchor_seq < last.seq)
                .values(anchor_seq=last.seq, anchor_hash=last.hash)
            )
    return removed
