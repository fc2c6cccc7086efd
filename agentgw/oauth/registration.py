"""RFC 7591 dynamic client registration: the metadata a client may send, and the registered clients.

Only public clients register (PKCE, `token_endpoint_auth_method: none`, no secret): native and
browser MCP clients, whose redirect URIs are loopback http (`127.0.0.1`, `localhost`, `[::1]`, any
port) or https. Every field a caller chooses is size-capped and unknown fields are refused, so what
the database stores and the login page shows is bounded. Registered clients live in the gateway's
database, so every node knows them; `admin:keys` lists and revokes them.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import JSON, Column, Engine, func
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col, select

from agentgw.oauth.revocation import revoke_row

__all__ = [
    "MAX_METADATA_BYTES",
    "ClientInfo",
    "ClientMetadata",
    "ClientStore",
    "RegisteredClientRow",
    "RegistrationError",
    "RegistrationLimiter",
    "parse_registration",
]

MAX_METADATA_BYTES = 8 * 1024
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_Url = Annotated[str, Field(max_length=512)]
_Short = Annotated[str, Field(max_length=200)]
_Grant = Literal["authorization_code", "refresh_token"]
GRANTS: tuple[_Grant, ...] = ("authorization_code", "refresh_token")
_Code = Literal["code"]
CODE: _Code = "code"


class RegistrationError(ValueError):
    """A registration request refused with an RFC 7591 error code."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _redirect_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.fragment or parts.username or parts.password or not parts.hostname:
        raise ValueError("a redirect URI is an absolute URL without fragment or user info")
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return uri
    raise ValueError("redirect URIs must be https, or http on a loopback host (127.0.0.1, localhost, [::1])")


class ClientMetadata(BaseModel):
    """The client metadata a public client may register (RFC 7591 section 2); nothing else."""

    model_config = ConfigDict(extra="forbid")

    redirect_uris: list[_Url] = Field(min_length=1, max_length=10)
    token_endpoint_auth_method: Literal["none"] = "none"  # noqa: S105  (a method name, not a secret)
    grant_types: list[_Grant] = Field(default_factory=lambda: [*GRANTS], max_length=2)
    response_types: list[_Code] = Field(default_factory=lambda: [CODE], max_length=1)
    client_name: str | None = Field(default=None, max_length=100)
    scope: str | None = Field(default=None, max_length=1000)
    client_uri: _Url | None = None
    logo_uri: _Url | None = None
    tos_uri: _Url | None = None
    policy_uri: _Url | None = None
    contacts: list[_Short] | None = Field(default=None, max_length=5)
    software_id: _Short | None = None
    software_version: _Short | None = None
    # OpenID Connect registration's field, sent by the MCP SDK.
    application_type: Literal["native", "web"] | None = None

    @field_validator("redirect_uris")
    @classmethod
    def _redirects(cls, value: list[str]) -> list[str]:
        return [_redirect_uri(uri) for uri in value]

    @field_validator("client_name", "scope", "software_id", "software_version")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # Shown on the login page and in listings: no control characters (terminal escapes, newlines).
        if value is not None and not value.isprintable():
            raise ValueError("control characters are not allowed")
        return value

    @field_validator("grant_types")
    @classmethod
    def _grants(cls, value: list[str]) -> list[str]:
        if "authorization_code" not in value:
            raise ValueError("a registered client uses the authorization_code grant")
        return value


def parse_registration(raw: bytes) -> ClientMetadata:
    """The metadata of a registration request body.

    Raises:
        RegistrationError: `invalid_redirect_uri` or `invalid_client_metadata`, saying why.
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise RegistrationError(
            "invalid_client_metadata", f"the metadata is larger than {MAX_METADATA_BYTES} bytes"
        )
    try:
        return ClientMetadata.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            message = f"{where}: unknown or unsupported field"
        elif first["loc"][:1] == ("token_endpoint_auth_method",):
            message = "only public clients register: token_endpoint_auth_method must be none"
        else:
            message = f"{where}: {first['msg']}"
        error = (
            "invalid_redirect_uri" if first["loc"][:1] == ("redirect_uris",) else "invalid_client_metadata"
        )
        raise RegistrationError(error, message) from exc


class RegisteredClientRow(SQLModel, table=True):
    __tablename__ = "oauth_client"

    client_id: str = SQLField(primary_key=True)
    client_name: str | None = None
    redirect_uris: list[str] = SQLField(default_factory=list, sa_column=Column(JSON, nullable=False))
    grant_types: list[str] = SQLField(default_factory=list, sa_column=Column(JSON, nullable=False))
    scope: str | None = None
    # The whole accepted document, echoed on registration and listed to admins.
    document: dict[str, Any] = SQLField(default_factory=dict, sa_column=Column(JSON, nullable=False))
    registered_from: str = ""
    created: datetime
    revoked: datetime | None = SQLField(default=None, index=True)


class ClientInfo(BaseModel):
    """A dynamically registered client, as listed to admins."""

    client_id: str
    client_name: str | None
    redirect_uris: list[str]
    grant_types: list[str]
    scope: str | None
    registered_from: str
    created: datetime
    revoked: datetime | None


def _info(row: RegisteredClientRow) -> ClientInfo:
    return ClientInfo.model_validate(row.model_dump())


class ClientStore:
    """Dynamically registered clients in the gateway's database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        SQLModel.metadata.create_all(engine, tables=[RegisteredClientRow.__table__])  # type: ignore[attr-defined]  # SQLModel tables are declared dynamically

    def register(self, metadata: ClientMetadata, *, source: str, max_clients: int) -> dict[str, Any]:
        """Store a new client; returns the RFC 7591 registration response.

        Raises:
            RegistrationError: the gateway holds `max_clients` live clients already.
        """
        document = metadata.model_dump(exclude_none=True)
        now = datetime.now(UTC)
        client_id = f"agc_{secrets.token_urlsafe(16)}"
        row = RegisteredClientRow(
            client_id=client_id,
            client_name=metadata.client_name,
            redirect_uris=list(metadata.redirect_uris),
            grant_types=list(metadata.grant_types),
            scope=metadata.scope,
            document=document,
            registered_from=source[:100],
            created=now,
        )
        with Session(self._engine) as session:
            live = session.exec(
                select(func.count())
                .select_from(RegisteredClientRow)
                .where(col(RegisteredClientRow.revoked).is_(None))
            ).one()
            if live >= max_clients:
                raise RegistrationError(
                    "invalid_client_metadata", "the gateway registers no more clients (limit reached)", 403
                )
            session.add(row)
            session.commit()
        return {**document, "client_id": client_id, "client_id_issued_at": int(now.timestamp())}

    def get(self, client_id: str) -> ClientInfo | None:
        """The live client `client_id`, or None (unknown or revoked)."""
        with Session(self._engine) as session:
            row = session.get(RegisteredClientRow, client_id)
            return _info(row) if row is not None and row.revoked is None else None

    def list(self) -> list[ClientInfo]:
        with Session(self._engine) as session:
            rows = session.exec(select(RegisteredClientRow).order_by(col(RegisteredClientRow.created)))
            return [_info(r) for r in rows]

    def revoke(self, client_id: str) -> bool:
        """Revoke a client; False if there is no such client (revoking twice is fine)."""
        return revoke_row(self._engine, RegisteredClientRow, client_id)


class RegistrationLimiter:
    """At most `per_minute` registrations per source address in any minute, on this node."""

    def __init__(self, per_minute: int, *, max_addresses: int = 10_000) -> None:
        self._per_minute = per_minute
        self._max_addresses = max_addresses
        self._seen: defaultdict[str, deque[float]] = defaultdict(deque)

    def allow(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if len(self._seen) > self._max_addresses:  # bounded memory whatever the number of addresses
            self._seen.clear()
        times = self._seen[address]
        while times and times[0] <= now - 60:
            times.popleft()
        if len(times) >= self._per_minute:
            return False
        times.append(now)
        return True
