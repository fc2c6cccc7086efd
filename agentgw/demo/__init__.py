"""The built-in demo: an upstream MCP server mounted in the gateway's own process, and its config."""
