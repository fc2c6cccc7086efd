"""The upstream credential as the upstream clients see it: a header value, obtained elsewhere.

The credentials stage (agentgw/filters/credentials.py) is the one place credentials are obtained,
cached and renewed; an upstream client that serves every caller over one connection (a bridged MCP
session) asks it through this protocol, and so never imports the stage.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["GatewayCredential"]


class GatewayCredential(Protocol):
    """The gateway's own credential for one upstream, for an HTTP client shared by every caller."""

    async def authorization(self, *, refresh: bool = False) -> str:
        """The Authorization header value; `refresh` after the upstream refused the last one.

        Raises:
            CredentialError: it cannot be obtained.
        """
        ...
