"""How claims from a verified ID token become a gateway user, and how long a provider sign-in lets a
user refresh (agentgw/oauth/federation.py); the flow itself: tests/e2e/test_oauth_federation.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from agentgw.oauth.config import IdentityProviderSettings
from agentgw.oauth.federation import (
    FederatedUser,
    FederatedUserRow,
    FederatedUsers,
    FederationError,
    OidcLogin,
)
from agentgw.oauth.pending import PendingLogins
from agentgw.storage import make_engine
from agentgw.storage.db import DatabaseSettings
from tests.support.proxy import TcpProxy

ISSUER = "https://idp.example"


def login(**overrides: Any) -> OidcLogin:
    settings = IdentityProviderSettings(issuer=ISSUER, client_id="gw", **overrides)
    return OidcLogin(
        settings,
        redirect_uri="https://gw.example/oauth/callback",
        http=httpx.AsyncClient(),
        # One in-memory database for every thread that uses it.
        pending=PendingLogins(
            create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        ),
    )


def test_groups_map_to_roles_and_an_unmapped_user_is_refused_by_default() -> None:
    mapped = login(role_map={"eng": ["developer", "role:reader"], "ops": ["operator"]})
    user = mapped.user({"sub": "alice", "groups": ["eng", "unrelated"]})
    assert user == FederatedUser("alice", ["developer", "reader"])
    with pytest.raises(FederationError, match="mallory is not allowed") as refused:
        mapped.user({"sub": "mallory", "groups": ["unrelated"]})
    assert refused.value.status == 403


def test_without_a_map_valid_group_names_are_roles_and_allow_any_admits_everyone() -> None:
    passthrough = login(groups_claim="realm_access.roles", allow="any")
    claims = {"sub": "bob", "realm_access": {"roles": ["reader", "Domain Users", "x" * 300]}}
    assert passthrough.user(claims) == FederatedUser("bob", ["reader"])
    assert passthrough.user({"sub": "carol"}) == FederatedUser("carol", [])


@pytest.mark.parametrize("name", [None, "", "has space", "a,b", "x" * 201, 42])
def test_a_name_claim_that_cannot_be_a_policy_subject_is_refused(name: object) -> None:
    with pytest.raises(FederationError, match="no usable user name"):
        login(name_claim="email", allow="any").user({"sub": "s", "email": name})


def test_settings_refuse_scopes_without_openid_and_symmetric_algorithms() -> None:
    with pytest.raises(ValueError, match="openid"):
        IdentityProviderSettings(issuer=ISSUER, client_id="gw", scopes=["email"])
    with pytest.raises(ValueError, match="not allowed"):
        IdentityProviderSettings(issuer=ISSUER, client_id="gw", algorithms=["HS256"])


def test_a_sign_in_lets_its_user_refresh_until_session_max_then_not(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    users = FederatedUsers(engine, issuer=ISSUER, session_max_s=3600)
    assert users.current("alice") is None
    users.signed_in(FederatedUser("alice", ["developer"]))
    assert users.current("alice") == FederatedUser("alice", ["developer"])
    users.signed_in(FederatedUser("alice", ["reader"]))  # the latest sign-in's roles count
    assert users.current("alice") == FederatedUser("alice", ["reader"])
    with Session(engine) as session:
        row = session.get(FederatedUserRow, "alice")
        assert row is not None
        row.signed_in = datetime.now(UTC) - timedelta(seconds=3601)
        session.add(row)
        session.commit()
    assert users.current("alice") is None
    # Another provider's record is not this one's.
    users.signed_in(FederatedUser("alice", ["reader"]))
    assert FederatedUsers(engine, issuer="https://other.example", session_max_s=3600).current("alice") is None


async def test_an_unknown_or_oversized_state_is_refused() -> None:
    with pytest.raises(FederationError, match="unknown or has expired"):
        await login().take("never-issued")
    with pytest.raises(FederationError, match="unknown or has expired"):
        await login().take("x" * 1000)


async def test_a_callback_while_the_database_is_out_of_reach_is_a_503_not_an_unknown_sign_in(
    own_postgres: str, postgres_proxy: TcpProxy
) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{postgres_proxy.port}/{own_postgres}"
    engine = make_engine(url, DatabaseSettings(statement_timeout_s=1.0))
    settings = IdentityProviderSettings(issuer=ISSUER, client_id="gw")
    async with httpx.AsyncClient() as http:
        login = OidcLogin(
            settings,
            redirect_uri="https://gw.example/oauth/callback",
            http=http,
            pending=PendingLogins(engine),
        )
        postgres_proxy.refuse()
        with pytest.raises(FederationError, match="unavailable right now") as refused:
            await login.take("a-state")
    assert refused.value.status == 503
    engine.dispose()
