"""agentgw: a default-deny, auditable gateway for agent traffic (MCP, A2A, LLM APIs)."""

__version__ = "0.1.0"
