"""Access tokens of a running gateway's built-in authorization server, minted by the test process.

token(gw, "alice", "/mcp/github", scopes=["repo"])   # a JWT for user alice, audience /mcp/github
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from tests.support.gateway import RunningGateway

__all__ = ["bearer", "token"]


def token(gw: RunningGateway, subject: str, endpoint: str, *, scopes: Sequence[str] = ()) -> str:
    """A token for `subject` whose audience is `endpoint` (a gateway path such as `/mcp`)."""
    data_dir = yaml.safe_load(gw.config_path.read_text()).get("data_dir")
    keys = SigningKeys(Path(data_dir) / "oauth-keys.json")
    value, _ = mint_token(
        keys, gw.url, subject=subject, audience=f"{gw.url}{endpoint}", client_id="tests", scopes=list(scopes)
    )
    return value


def bearer(gw: RunningGateway, subject: str, endpoint: str, *, scopes: Sequence[str] = ()) -> dict[str, str]:
    """The Authorization header of `token(...)`."""
    return {"authorization": f"Bearer {token(gw, subject, endpoint, scopes=scopes)}"}
