"""Signing keys: a private file, a public JWKS, rotation that keeps recent keys published."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agentgw.identity import signing_keys
from agentgw.oauth.keys import KEEP, SigningKeys
from agentgw.settings import load_settings


def test_a_missing_key_file_is_created_owner_only_with_one_key(tmp_path: Path) -> None:
    keys = SigningKeys(tmp_path / "sub" / "keys.json")
    assert stat.S_IMODE((tmp_path / "sub" / "keys.json").stat().st_mode) == 0o600
    jwks = keys.jwks()["keys"]
    assert len(jwks) == 1 and jwks[0]["alg"] == "RS256" and jwks[0]["use"] == "sig"
    assert not {"d", "p", "q"} & set(jwks[0])  # nothing private is published
    assert SigningKeys(tmp_path / "sub" / "keys.json").jwks() == keys.jwks()  # the file is reused


def test_rotation_publishes_the_new_key_first_and_keeps_only_recent_ones(tmp_path: Path) -> None:
    keys = SigningKeys(tmp_path / "keys.json")
    first = keys.jwks()["keys"][0]["kid"]
    kids = [keys.rotate() for _ in range(KEEP)]
    published = [k["kid"] for k in keys.jwks()["keys"]]
    assert published[0] == kids[-1] and len(published) == KEEP and first not in published


def test_a_key_rotated_by_another_process_is_found_by_its_kid(tmp_path: Path) -> None:
    gateway = SigningKeys(tmp_path / "keys.json")
    cli = SigningKeys(tmp_path / "keys.json")
    new = cli.rotate()
    gateway._loaded_at -= 10  # the reload rate bound has passed
    assert gateway.public_jwk(new) is not None
    assert gateway.public_jwk("never-existed") is None


def test_rotation_is_due_only_after_the_configured_age(tmp_path: Path) -> None:
    keys = SigningKeys(tmp_path / "keys.json", rotate_after_s=3600)
    assert not keys.rotate_if_due()
    assert SigningKeys(tmp_path / "keys.json", rotate_after_s=1e-9).rotate_if_due()


def test_a_corrupt_key_file_is_an_error_not_a_silent_new_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"kid": "a", "created": 0, "private_pem": "nope"}]}))
    with pytest.raises(ValueError, match="cannot read signing keys"):
        SigningKeys(path)


def test_the_signing_keys_and_database_live_in_an_owner_only_data_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = load_settings(None, data_dir=state)
    assert settings.database_url == f"sqlite:///{state / 'agentgw.db'}"
    keys = signing_keys(settings)
    assert keys.path == state / "oauth-keys.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    # Another database does not move the keys: every command finds them by data_dir alone.
    elsewhere = load_settings(None, data_dir=state, database_url="postgresql://db/agentgw")
    assert signing_keys(elsewhere).jwks() == keys.jwks()
