"""Logins of the built-in authorization server waiting for their next request, in the database.

Two kinds: authorization codes, waiting for their client to redeem them at the token endpoint; and
sign-ins at the organisation's OpenID provider (agentgw/oauth/federation.py), waiting for the browser
to come back to `/oauth/callback`. Both live in the gateway's database, so that the next request may
land on any node.

A code or a `state` is a bearer secret: each is kept as its SHA-256 (both are random, at least
256 bits, so no slow hash), and a database reader finds nothing to present. Each is taken by one
`DELETE ... RETURNING`: of two requests racing with one code, on one node or on two, the database
gives the row to one and none to the other. Expiry is checked against the wall clock the nodes
share (a monotonic clock is each process's own). Expired rows are swept, a batch at a time, as new
ones are written, skipping rows another node's sweep holds (two sweeps never wait on each other).

Anyone may start a sign-in at the provider (the login page's first request needs no account), so
pending sign-ins are bounded, per client and in all; the counts are read in the transaction that
adds the row, so nodes racing at the limit may overshoot it by the requests in flight, never more.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import JSON, Column, Connection, Engine, Table, delete, func, insert, select
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

__all__ = ["IssuedCode", "Pending", "PendingLogins"]

MAX_PENDING = 10_000
MAX_PENDING_PER_CLIENT = 1_000
MAX_SECRET = 200  # a code or state longer than any this server issues is nobody's
SWEEP_BATCH = 100


class CodeRow(SQLModel, table=True):
    __tablename__ = "oauth_code"

    code_sha256: str = SQLField(primary_key=True)
    client_id: str
    redirect_uri: str | None = None
    scope: str = ""
    subject: str
    roles: list[str] = SQLField(sa_column=Column(JSON, nullable=False))
    resource: str
    code_challenge: str
    code_challenge_method: str
    expires_at: float = SQLField(index=True)


class SignInRow(SQLModel, table=True):
    __tablename__ = "oauth_pending_sign_in"

    state_sha256: str = SQLField(primary_key=True)
    client_id: str = SQLField(index=True)
    params: dict[str, list[str]] = SQLField(sa_column=Column(JSON, nullable=False))
    nonce: str
    verifier: str
    expires_at: float = SQLField(index=True)


CODES: Table = SQLModel.metadata.tables["oauth_code"]
SIGN_INS: Table = SQLModel.metadata.tables["oauth_pending_sign_in"]


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """What an authorization code stands for: who signed in, for which client, request and resource."""

    client_id: str
    redirect_uri: str | None
    scope: str
    subject: str
    roles: list[str]
    resource: str
    code_challenge: str
    code_challenge_method: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A client's authorization request, waiting for the user to come back from the provider."""

    params: dict[str, list[str]]
    nonce: str
    verifier: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _sweep(conn: Connection, table: Table, now: float) -> None:
    key = table.primary_key.columns[0]
    expired = (
        select(key).where(table.c.expires_at <= now).limit(SWEEP_BATCH).with_for_update(skip_locked=True)
    )
    conn.execute(delete(table).where(key.in_(expired.scalar_subquery())))


class PendingLogins:
    """Authorization codes and sign-ins at the provider, each used at most once, on any node.

    Every method raises `sqlalchemy.exc.SQLAlchemyError` when the database cannot be reached; nothing
    is then written (one transaction each).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_pending: int = MAX_PENDING,
        max_pending_per_client: int = MAX_PENDING_PER_CLIENT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self._max_pending = max_pending
        self._max_per_client = max_pending_per_client
        self._clock = clock
        SQLModel.metadata.create_all(engine, tables=[CODES, SIGN_INS])

    def save_code(self, code: str, issued: IssuedCode, ttl_s: float) -> None:
        """Keep `code` (as its digest) for `ttl_s` seconds."""
        now = self._clock()
        with self.engine.begin() as conn:
            _sweep(conn, CODES, now)
            conn.execute(
                insert(CODES).values(
                    code_sha256=_digest(code),
                    client_id=issued.client_id,
                    redirect_uri=issued.redirect_uri,
                    scope=issued.scope,
                    subject=issued.subject,
                    roles=list(issued.roles),
                    resource=issued.resource,
                    code_challenge=issued.code_challenge,
                    code_challenge_method=issued.code_challenge_method,
                    expires_at=now + ttl_s,
                )
            )

    def take_code(self, code: str) -> IssuedCode | None:
        """What `code` stands for, once: None if unknown, taken before, or expired (it is gone then)."""
        if not 0 < len(code) <= MAX_SECRET:
            return None
        with self.engine.begin() as conn:
            row = conn.execute(
                delete(CODES).where(CODES.c.code_sha256 == _digest(code)).returning(*CODES.c)
            ).first()
        if row is None or row.expires_at <= self._clock():
            return None
        return IssuedCode(
            row.client_id,
            row.redirect_uri,
            row.scope,
            row.subject,
            list(row.roles),
            row.resource,
            row.code_challenge,
            row.code_challenge_method,
        )

    def save_sign_in(self, state: str, client_id: str, pending: Pending, ttl_s: float) -> bool:
        """Keep a sign-in under `state` (as its digest) for `ttl_s` seconds; False (and nothing kept)
        when as many are pending as the limits allow, for this client or in all."""
        now = self._clock()
        with self.engine.begin() as conn:
            _sweep(conn, SIGN_INS, now)
            total, mine = conn.execute(
                select(func.count(), func.count().filter(SIGN_INS.c.client_id == client_id)).where(
                    SIGN_INS.c.expires_at > now
                )
            ).one()
            if total >= self._max_pending or mine >= self._max_per_client:
                return False
            conn.execute(
                insert(SIGN_INS).values(
                    state_sha256=_digest(state),
                    client_id=client_id,
                    params=pending.params,
                    nonce=pending.nonce,
                    verifier=pending.verifier,
                    expires_at=now + ttl_s,
                )
            )
        return True

    def take_sign_in(self, state: str) -> Pending | None:
        """The sign-in of `state`, once: None if unknown, taken before, or expired (it is gone then)."""
        if not 0 < len(state) <= MAX_SECRET:
            return None
        with self.engine.begin() as conn:
            row = conn.execute(
                delete(SIGN_INS).where(SIGN_INS.c.state_sha256 == _digest(state)).returning(*SIGN_INS.c)
            ).first()
        if row is None or row.expires_at <= self._clock():
            return None
        return Pending({k: list(v) for k, v in row.params.items()}, row.nonce, row.verifier)
