"""The upstream credential as the upstream clients see it: a header value, obtained elsewhere.

The credentials stage (agentgw/filters/credentials.py) is the one place credentials are obtained,
cached and renewed; an upstream client that serves every caller over one connection (a bridged MCP
session) asks it through this protocol, and so never imports the stage. `SharedToken` is what the
stage's cache and the store that shares it between nodes (agentgw/storage/token_cache.py) exchange.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["GatewayCredential", "SharedToken", "token_digest"]


class GatewayCredential(Protocol):
    """The gateway's own credential for one upstream, for an HTTP client shared by every caller."""

    async def authorization(self, *, refresh: bool = False) -> str:
        """The Authorization header value; `refresh` after the upstream refused the last one.

        Raises:
            CredentialError: it cannot be obtained.
        """
        ...


@dataclass(frozen=True, slots=True)
class SharedToken:
    """An upstream credential as the shared token cache keeps it for every node.

    Attributes:
        authorization: the header value (a secret: stored encrypted, never logged).
        header: the header that carries it upstream.
        actors: the delegation chain the upstream will see, current first.
        expires_at: wall-clock time (`time.time()`) after which no node may use it.
    """

    authorization: str = field(repr=False)
    header: str
    actors: tuple[str, ...]
    expires_at: float


def token_digest(authorization: str) -> str:
    """Which token an eviction names, told to every node: its SHA-256, never the token."""
    return hashlib.sha256(authorization.encode()).hexdigest()
