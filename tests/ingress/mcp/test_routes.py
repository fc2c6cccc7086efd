"""Which MCP URL a path is: the streamable-HTTP endpoints and the legs of the HTTP+SSE transport."""

from __future__ import annotations

import pytest

from agentgw.ingress.mcp.routes import path_params


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/mcp", {}),
        ("/mcp/github", {"server": "github"}),
        # `sse` and `messages` are valid server names: their endpoints are theirs.
        ("/mcp/sse", {"server": "sse"}),
        ("/mcp/messages", {"server": "messages"}),
        ("/mcp/_sse", {"leg": "sse"}),
        ("/mcp/_messages", {"leg": "messages"}),
        ("/mcp/github/sse", {"server": "github", "leg": "sse"}),
        ("/mcp/sse/messages", {"server": "sse", "leg": "messages"}),
    ],
)
def test_every_mcp_url_names_its_endpoint_and_leg(path: str, params: dict[str, str]) -> None:
    assert path_params(path) == params


@pytest.mark.parametrize(
    "path", ["/mcpx", "/mcp/", "/mcp//sse", "/mcp/github/other", "/mcp/github/sse/x", "/v1"]
)
def test_anything_else_is_no_mcp_url(path: str) -> None:
    assert path_params(path) is None
