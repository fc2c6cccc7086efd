"""API keys: shown once, stored hashed, mapped to a subject and roles, revocable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session, select

from agentgw.oauth.apikeys import ApiKeyRow, ApiKeyStore, NewApiKey, role_names
from agentgw.storage import make_engine


@pytest.fixture
def store(tmp_path: Path) -> ApiKeyStore:
    return ApiKeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))


def test_a_key_is_shown_once_and_only_its_hash_is_stored(store: ApiKeyStore, tmp_path: Path) -> None:
    created = store.create(NewApiKey(subject="client:ci", roles=["operator"], scopes=["s"]))
    assert created.key.startswith(f"agk_{created.id}_")
    secret = created.key.split("_", 2)[2]
    with Session(store._engine) as session:
        row = session.exec(select(ApiKeyRow)).one()
    assert secret not in row.model_dump_json() and row.secret_sha256 != secret
    assert [k.id for k in store.list()] == [created.id]
    assert "key" not in store.list()[0].model_dump()
    info = store.check(created.key)
    assert info is not None and info.subject == "client:ci" and info.roles == ["role:operator"]


def test_wrong_malformed_and_revoked_keys_do_not_check(store: ApiKeyStore) -> None:
    created = store.create(NewApiKey(subject="user:bob"))
    key_id = created.id
    assert store.check(created.key[:-1] + ("A" if created.key[-1] != "A" else "B")) is None
    assert store.check(f"agk_{key_id}_short") is None
    assert store.check("agk_ffffffffffff_" + "A" * 43) is None
    assert store.revoke(key_id) and store.revoke(key_id) and not store.revoke("nope")
    assert store.check(created.key) is None
    assert store.list()[0].revoked is not None


@pytest.mark.parametrize("subject", ["alice", "role:admin", "user:", "user:a b", "client:x,y", "*"])
def test_a_key_maps_only_to_a_user_or_client_subject(subject: str) -> None:
    with pytest.raises(ValidationError):
        NewApiKey(subject=subject)


def test_role_names_are_normalised_and_validated() -> None:
    assert role_names(["ops", "role:ops", "sec"]) == ("role:ops", "role:sec")
    with pytest.raises(ValueError):
        role_names(["two words"])
