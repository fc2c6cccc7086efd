"""The registry of upstreams: MCP servers and virtual servers (A2A agents and LLM routes follow)."""
