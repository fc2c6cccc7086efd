"""The built-in authorization server's signing keys: a JSON key file, a JWKS, and rotation.

The file holds every key still published (newest first) and is replaced atomically, so the gateway
and `agentgw token issue` / `agentgw keys rotate-signing` can share it. After a rotation the old key
stays in the JWKS for `KEEP` generations, long enough for the tokens it signed to expire.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

__all__ = ["ALGORITHM", "KEEP", "SigningKeys"]

ALGORITHM = "RS256"
KEEP = 3
# Another process may rotate the file; an unknown kid rereads it at most this often.
RELOAD_MIN_S = 1.0


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    created: float
    private: rsa.RSAPrivateKey

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


def _new_key() -> _Key:
    return _Key(secrets.token_urlsafe(12), time.time(), rsa.generate_private_key(65537, 2048))


class SigningKeys:
    """Signing keys in a file; created with a first key when the file is missing."""

    def __init__(self, path: Path, *, rotate_after_s: float = 30 * 86400) -> None:
        self._path = path
        self._rotate_after = rotate_after_s
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._keys: list[_Key] = []
        if path.exists():
            self._keys = self._read()
        if not self._keys:
            self._keys = [_new_key()]
            self._write()

    @property
    def path(self) -> Path:
        return self._path

    def _read(self) -> list[_Key]:
        try:
            data = json.loads(self._path.read_text())
            keys = [
                _Key(
                    str(item["kid"]),
                    float(item["created"]),
                    _rsa(serialization.load_pem_private_key(item["private_pem"].encode(), password=None)),
                )
                for item in data["keys"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read signing keys from {self._path}: {exc}") from exc
        self._loaded_at = time.monotonic()
        return keys

    def _write(self) -> None:
        items = [
            {
                "kid": key.kid,
                "created": key.created,
                "private_pem": key.private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
            }
            for key in self._keys
        ]
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.{secrets.token_hex(4)}")
        # Private keys: owner-only from the first byte, then an atomic rename over the old file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"keys": items}, out)
        tmp.replace(self._path)
        self._loaded_at = time.monotonic()

    def rotate_if_due(self) -> bool:
        """Rotate when the current key is older than `rotate_after_s`; True if it rotated."""
        if time.time() - self._keys[0].created < self._rotate_after:
            return False
        self.rotate()
        return True

    def rotate(self) -> str:
        """Make a new current key; keep the newest older ones published. Returns the new kid."""
        with self._lock:
            if self._path.exists():
                self._keys = self._read() or self._keys
            self._keys = [_new_key(), *self._keys][:KEEP]
            self._write()
            return self._keys[0].kid

    def jwks(self) -> dict[str, Any]:
        """The public JWK set: every key still published."""
        return {"keys": [key.public_jwk() for key in self._keys]}

    def public_jwk(self, kid: str) -> dict[str, Any] | None:
        """The public JWK for `kid`; an unknown kid rereads the file (rate-bounded) once."""
        for key in self._keys:
            if key.kid == kid:
                return key.public_jwk()
        if time.monotonic() - self._loaded_at >= RELOAD_MIN_S and self._path.exists():
            with self._lock:
                try:
                    self._keys = self._read() or self._keys
                except ValueError:
                    return None
            for key in self._keys:
                if key.kid == kid:
                    return key.public_jwk()
        return None

    def current(self) -> tuple[str, rsa.RSAPrivateKey]:
        """The current key's kid and private key, for documents other than tokens (signed A2A cards)."""
        key = self._keys[0]
        return key.kid, key.private

    def sign(self, claims: dict[str, Any]) -> str:
        """A JWT access token (`typ: at+jwt`, RFC 9068) signed with the current key."""
        key = self._keys[0]
        return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "at+jwt"})


def _rsa(key: Any) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key
