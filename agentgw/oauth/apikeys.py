"""API keys for service accounts: `agk_<id>_<secret>` bearer tokens, stored as a SHA-256 of the secret.

The plaintext is returned once, at creation; the database holds only the id, the hash and what the
key maps to (a subject, roles, scopes). Revocation is a timestamp, so the audit trail keeps the key.
The secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import JSON, Column, Engine
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col, select

from agentgw.api_contract import Guard, errors
from agentgw.call import Principal
from agentgw.errors import Unauthenticated
from agentgw.oauth.revocation import revoke_row

__all__ = [
    "KEY_PREFIX",
    "ApiKeyRow",
    "ApiKeyStore",
    "ApiKeyVerifier",
    "NewApiKey",
    "api_key_router",
    "role_names",
]

KEY_PREFIX = "agk_"
_KEY = re.compile(r"^agk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
SUBJECT = re.compile(r"^(client|user):[A-Za-z0-9._@-]{1,200}$")
ROLE = re.compile(r"^[A-Za-z0-9._@:/-]{1,200}$")
# `ROLE`, with or without `role:`, for the OpenAPI document.
ROLE_ITEM = r"^(?:role:)?[A-Za-z0-9._@:/-]{1,200}$"


def role_names(roles: Sequence[str]) -> tuple[str, ...]:
    """Policy subjects for role names: `security` and `role:security` both become `role:security`.

    Raises:
        ValueError: a role name with characters outside `[A-Za-z0-9._@:/-]`.
    """
    out = []
    for role in roles:
        name = role.removeprefix("role:")
        if not ROLE.fullmatch(name):
            raise ValueError(f"invalid role name {role!r}")
        out.append(f"role:{name}")
    return tuple(sorted(set(out)))


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = SQLField(primary_key=True)
    secret_sha256: str
    subject: str = SQLField(index=True)
    roles: list[str] = SQLField(default_factory=list, sa_column=Column(JSON, nullable=False))
    scopes: list[str] = SQLField(default_factory=list, sa_column=Column(JSON, nullable=False))
    note: str = ""
    created: datetime
    revoked: datetime | None = None


class NewApiKey(BaseModel):
    """What an API key maps to."""

    subject: str = Field(
        description="client:<name> or user:<name>", json_schema_extra={"pattern": SUBJECT.pattern}
    )
    roles: list[str] = Field(
        default_factory=list, json_schema_extra={"items": {"type": "string", "pattern": ROLE_ITEM}}
    )
    scopes: list[str] = Field(
        default_factory=list, json_schema_extra={"items": {"type": "string", "pattern": r'^[^ "]+$'}}
    )
    note: str = Field(default="", max_length=500)

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        if not SUBJECT.fullmatch(value):
            raise ValueError("subject must be client:<name> or user:<name> with [A-Za-z0-9._@-]")
        return value

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        return list(role_names(value))

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if any(not s or " " in s or '"' in s for s in value):
            raise ValueError("scopes are non-empty strings without spaces or quotes")
        return value


class ApiKeyInfo(BaseModel):
    """An API key as listed: everything but the secret."""

    id: str
    subject: str
    roles: list[str]
    scopes: list[str]
    note: str
    created: datetime
    revoked: datetime | None


class CreatedApiKey(ApiKeyInfo):
    key: str = Field(description="the key itself; shown only in this answer")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo.model_validate(row.model_dump())


class ApiKeyStore:
    """API keys in the gateway's database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        SQLModel.metadata.create_all(engine, tables=[ApiKeyRow.__table__])  # type: ignore[attr-defined]  # SQLModel tables are declared dynamically

    def create(self, new: NewApiKey) -> CreatedApiKey:
        """Store a new key and return it with its plaintext (never retrievable again)."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=key_id,
            secret_sha256=_digest(secret),
            subject=new.subject,
            roles=new.roles,
            scopes=new.scopes,
            note=new.note,
            created=datetime.now(UTC),
        )
        with Session(self._engine) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            info = _info(row)
        return CreatedApiKey(**info.model_dump(), key=f"{KEY_PREFIX}{key_id}_{secret}")

    def list(self) -> list[ApiKeyInfo]:
        with Session(self._engine) as session:
            return [_info(r) for r in session.exec(select(ApiKeyRow).order_by(col(ApiKeyRow.created)))]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; False if there is no such key (revoking twice is fine)."""
        return revoke_row(self._engine, ApiKeyRow, key_id)

    def check(self, key: str) -> ApiKeyInfo | None:
        """The live key that `key` is, or None (malformed, unknown, wrong secret, or revoked)."""
        match = _KEY.fullmatch(key)
        if match is None:
            return None
        key_id, secret = match.groups()
        with Session(self._engine) as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None or row.revoked is not None:
                return None
            if not hmac.compare_digest(row.secret_sha256, _digest(secret)):
                return None
            return _info(row)


@dataclass(slots=True)
class _Cached:
    principal: Principal
    until: float


class ApiKeyVerifier:
    """Turns an API key into its principal; a verified key is remembered for `cache_s` seconds."""

    def __init__(self, store: ApiKeyStore, *, cache_s: float) -> None:
        self._store = store
        self._cache_s = cache_s
        self._cache: dict[str, _Cached] = {}

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached verifications (all, or those of one key) after a revocation."""
        if key_id is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if k.startswith(f"{KEY_PREFIX}{key_id}_")]:
            del self._cache[key]

    async def verify(self, credential: str, resource: str) -> Principal:
        """The principal of an API key; API keys are for the whole gateway, whatever `resource`.

        Raises:
            Unauthenticated: malformed, unknown, wrong or revoked key.
        """
        cached = self._cache.get(credential)
        now = time.monotonic()
        if cached is not None and cached.until > now:
            return cached.principal
        info = await anyio.to_thread.run_sync(self._store.check, credential)
        if info is None:
            self._cache.pop(credential, None)
            raise Unauthenticated("invalid API key")
        principal = Principal(
            subject=info.subject,
            client_id=info.subject.removeprefix("client:") if info.subject.startswith("client:") else None,
            roles=tuple(info.roles),
            scopes=frozenset(info.scopes),
            credential=credential,
        )
        if self._cache_s > 0:
            if len(self._cache) > 10_000:  # bounded: keys are few, but a flood of bad keys is not cached
                self._cache.clear()
            self._cache[credential] = _Cached(principal, now + self._cache_s)
        return principal


def api_key_router(
    store: ApiKeyStore, verifier: ApiKeyVerifier, read_guard: Guard, write_guard: Guard
) -> APIRouter:
    """Routes under /admin/keys, guarded by the policy grant on `admin:keys`."""
    router = APIRouter(prefix="/admin/keys", tags=["keys"])
    # Plain defaults, not Annotated aliases: under postponed annotations FastAPI cannot see a local alias.
    read = Depends(read_guard)
    write = Depends(write_guard)

    @router.get("", response_model=list[ApiKeyInfo])
    async def list_keys(_: Any = read) -> list[ApiKeyInfo]:
        return await anyio.to_thread.run_sync(store.list)

    @router.post("", response_model=CreatedApiKey, status_code=status.HTTP_201_CREATED, responses=errors(400))
    async def create_key(new: NewApiKey, _: Any = write) -> CreatedApiKey:
        return await anyio.to_thread.run_sync(store.create, new)

    @router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404))
    async def revoke_key(key_id: str, _: Any = write) -> None:
        if not await anyio.to_thread.run_sync(store.revoke, key_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key {key_id!r}")
        verifier.forget(key_id)

    return router
