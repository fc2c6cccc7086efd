"""Refresh tokens of the built-in authorization server: one login, rotated on every use.

A login (one user's authorization of one client, for one resource) is a row; each refresh token is
another, kept as a SHA-256 (the token is 256 random bits, so no slow hash). Using a refresh token
marks it used and issues its successor in the same login. A used token presented again means two
parties hold it: the whole login is revoked, the successor included (OAuth 2.0 Security BCP,
section 4.14). Every check and change is a conditional UPDATE, so two nodes racing on one token
cannot both win, and a successor is only issued while its login is live.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, update
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col, select

__all__ = ["Login", "RefreshRefused", "RefreshTokenStore"]

TOKEN_PREFIX = "agr_"  # noqa: S105  (a prefix, not a secret)


class RefreshRefused(ValueError):
    """The refresh token cannot be used; the message says why (for the `invalid_grant` answer)."""


class LoginRow(SQLModel, table=True):
    __tablename__ = "oauth_login"

    id: str = SQLField(primary_key=True)
    client_id: str = SQLField(index=True)
    subject: str
    scope: str = ""
    resource: str
    created: datetime
    expires: datetime = SQLField(index=True)
    rotated: datetime | None = None
    revoked: datetime | None = None


class RefreshTokenRow(SQLModel, table=True):
    __tablename__ = "oauth_refresh_token"

    token_sha256: str = SQLField(primary_key=True)
    login_id: str = SQLField(index=True)
    expires: datetime = SQLField(index=True)
    used: datetime | None = None


@dataclass(frozen=True, slots=True)
class Login:
    """What a live refresh token stands for."""

    id: str
    client_id: str
    subject: str
    scope: str
    resource: str

    def get_scope(self) -> str:  # authlib's token model
        return self.scope

    def check_client(self, client: object) -> bool:  # authlib's token model
        return getattr(client, "client_id", None) == self.client_id


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was stored as UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class RefreshTokenStore:
    """Logins and their refresh tokens in the gateway's database."""

    def __init__(self, engine: Engine, *, ttl_s: int, max_s: int) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_s)
        self._max = timedelta(seconds=max_s)
        SQLModel.metadata.create_all(
            engine,
            tables=[LoginRow.__table__, RefreshTokenRow.__table__],  # type: ignore[attr-defined]  # SQLModel tables are declared dynamically
        )

    def start(self, *, client_id: str, subject: str, scope: str, resource: str) -> str:
        """A new login; returns its first refresh token."""
        now = datetime.now(UTC)
        login = LoginRow(
            id=secrets.token_hex(12),
            client_id=client_id,
            subject=subject,
            scope=scope,
            resource=resource,
            created=now,
            expires=now + self._max,
        )
        token = f"{TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
        with Session(self._engine) as session:
            self._prune(session, now)
            session.add(login)
            session.add(
                RefreshTokenRow(token_sha256=_digest(token), login_id=login.id, expires=now + self._ttl)
            )
            session.commit()
        return token

    def take(self, token: str, client_id: str, check: Callable[[Login], None] | None = None) -> Login:
        """Use a refresh token once: it is marked used, and its login returned. `check` may refuse the
        request first (by raising), leaving the token unused.

        Raises:
            RefreshRefused: unknown, another client's, expired, revoked, or used before (which
                revokes its login).
        """
        now = datetime.now(UTC)
        with Session(self._engine) as session:
            row = session.get(RefreshTokenRow, _digest(token))
            login = session.get(LoginRow, row.login_id) if row is not None else None
            if row is None or login is None or login.client_id != client_id:
                raise RefreshRefused("unknown refresh token")
            if login.revoked is not None:
                raise RefreshRefused("the login was revoked")
            if _aware(row.expires) <= now or _aware(login.expires) <= now:
                raise RefreshRefused("the refresh token has expired")
            found = Login(login.id, login.client_id, login.subject, login.scope, login.resource)
            if check is not None:
                check(found)
            marked = session.exec(
                update(RefreshTokenRow)
                .where(
                    col(RefreshTokenRow.token_sha256) == row.token_sha256, col(RefreshTokenRow.used).is_(None)
                )
                .values(used=now)
            )
            if marked.rowcount != 1:
                session.rollback()
                self._revoke(session, login.id, now)
                session.commit()
                raise RefreshRefused("the refresh token was used before: the login is revoked")
            session.commit()
            return found

    def rotate(self, login_id: str) -> str:
        """The next refresh token of a live login.

        Raises:
            RefreshRefused: the login was revoked (or ended) meanwhile.
        """
        now = datetime.now(UTC)
        token = f"{TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
        with Session(self._engine) as session:
            # Locks the login row: a concurrent revocation either comes first (no successor) or
            # after this commits (and revokes the successor with the login).
            bumped = session.exec(
                update(LoginRow)
                .where(
                    col(LoginRow.id) == login_id, col(LoginRow.revoked).is_(None), col(LoginRow.expires) > now
                )
                .values(rotated=now)
            )
            if bumped.rowcount != 1:
                session.rollback()
                raise RefreshRefused("the login was revoked")
            session.add(
                RefreshTokenRow(token_sha256=_digest(token), login_id=login_id, expires=now + self._ttl)
            )
            session.commit()
        return token

    def revoke_token(self, token: str, client_id: str) -> bool:
        """RFC 7009: revoke the login of `token` if it is `client_id`'s; False if it is not known."""
        with Session(self._engine) as session:
            row = session.get(RefreshTokenRow, _digest(token))
            login = session.get(LoginRow, row.login_id) if row is not None else None
            if login is None or login.client_id != client_id:
                return False
            self._revoke(session, login.id, datetime.now(UTC))
            session.commit()
            return True

    def revoke_client(self, client_id: str) -> None:
        """Revoke every login of a client (the client itself was revoked)."""
        with Session(self._engine) as session:
            session.exec(
                update(LoginRow)
                .where(col(LoginRow.client_id) == client_id, col(LoginRow.revoked).is_(None))
                .values(revoked=datetime.now(UTC))
            )
            session.commit()

    @staticmethod
    def _revoke(session: Session, login_id: str, now: datetime) -> None:
        session.exec(
            update(LoginRow)
            .where(col(LoginRow.id) == login_id, col(LoginRow.revoked).is_(None))
            .values(revoked=now)
        )

    @staticmethod
    def _prune(session: Session, now: datetime) -> None:
        # Used tokens stay until their login ends: reuse detection needs them.
        ended = list(session.exec(select(LoginRow.id).where(col(LoginRow.expires) <= now).limit(100)))
        if ended:
            session.exec(delete(RefreshTokenRow).where(col(RefreshTokenRow.login_id).in_(ended)))
            session.exec(delete(LoginRow).where(col(LoginRow.id).in_(ended)))
