"""Where a trusted issuer's public keys come from: its JWKS over HTTP (cached), or the local key file.

A remote JWKS is fetched on first use, refetched when older than `max_age_s`, and refetched early
when a token names an unknown `kid` (a rotation at the IdP) but never more often than
`min_refresh_s`, so a stream of forged kids cannot turn the gateway into a load generator.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx

from agentgw.errors import Unavailable
from agentgw.oauth.keys import SigningKeys

__all__ = ["KeySet", "LocalKeySet", "RemoteKeySet", "metadata_urls"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0


class KeySet(Protocol):
    """The public keys of one issuer."""

    async def key(self, kid: str | None) -> dict[str, Any] | None:
        """The public JWK for `kid` (or the only key when `kid` is None), else None.

        Raises:
            Unavailable: no keys could ever be fetched for this issuer.
        """
        ...


class LocalKeySet:
    """The built-in authorization server's own keys, read from its key file (no HTTP to itself)."""

    def __init__(self, keys: SigningKeys) -> None:
        self._keys = keys

    async def key(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:
            return None  # the built-in server always names its key
        return self._keys.public_jwk(kid)


def metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 (path-aware) then OpenID discovery URLs for `issuer`."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = (parts.scheme, parts.netloc)
    return [
        urlunsplit((*origin, f"/.well-known/oauth-authorization-server{path}", "", "")),
        urlunsplit((*origin, f"{path}/.well-known/openid-configuration", "", "")),
    ]


class RemoteKeySet:
    """An external issuer's JWKS, fetched with `http` and cached."""

    def __init__(
        self,
        issuer: str,
        jwks_uri: str | None,
        http: httpx.AsyncClient,
        *,
        min_refresh_s: float,
        max_age_s: float,
    ) -> None:
        self._issuer = issuer
        self._jwks_uri = jwks_uri
        self._http = http
        self._min_refresh = min_refresh_s
        self._max_age = max_age_s
        self._keys: list[dict[str, Any]] = []
        self._fetched_at: float | None = None  # monotonic time of the last attempt
        self._fetched_ok = False
        self._lock = anyio.Lock()

    async def key(self, kid: str | None) -> dict[str, Any] | None:
        found = self._find(kid)
        if found is not None and not self._due(self._max_age):
            return found
        if found is None or not self._lock.locked():
            # No key for this kid (none loaded yet, or a rotation): wait for a fetch in progress and
            # look again, so a burst right after start finds the keys the first caller fetched. A
            # known key that is only old does not wait: another caller is refreshing it already.
            async with self._lock:
                found = self._find(kid)
                if self._due(self._max_age) or (found is None and self._due(self._min_refresh)):
                    await self._refresh()
                    found = self._find(kid)
        if not self._fetched_ok and not self._keys:
            raise Unavailable(f"the signing keys of issuer {self._issuer} cannot be fetched")
        return found

    def _due(self, age_s: float) -> bool:
        """Whether the last fetch attempt is at least `age_s` old (or there was none)."""
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= age_s

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return next((k for k in self._keys if k.get("kid") == kid), None)

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            uri = self._jwks_uri or await self._discover()
            response = await self._http.get(uri, timeout=FETCH_TIMEOUT_S)
            response.raise_for_status()
            data = response.json()
            keys = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(keys, list):
                raise ValueError("the JWKS has no keys array")
        except (httpx.HTTPError, ValueError) as exc:
            # Keep serving the keys fetched before: an IdP hiccup must not log everyone out.
            log.warning("JWKS refresh failed issuer=%s error=%s", self._issuer, exc)
            return
        self._keys = [k for k in keys if isinstance(k, dict)]
        self._fetched_ok = True

    async def _discover(self) -> str:
        for url in metadata_urls(self._issuer):
            response = await self._http.get(url, timeout=FETCH_TIMEOUT_S)
            if response.status_code != 200:
                continue
            metadata = response.json()
            if not isinstance(metadata, dict) or metadata.get("issuer") != self._issuer:
                raise ValueError(f"the metadata at {url} is not for issuer {self._issuer}")
            uri = metadata.get("jwks_uri")
            if isinstance(uri, str) and uri:
                self._jwks_uri = uri
                return uri
        raise ValueError(f"no metadata with a jwks_uri found for issuer {self._issuer}")
