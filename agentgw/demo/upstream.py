"""A small MCP server for the demo: two harmless tools and one that the demo policy keeps away."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

__all__ = ["demo_server"]


def demo_server() -> MCPServer:
    server = MCPServer("agentgw-demo", instructions="Demo upstream served behind agentgw.")

    @server.tool()
    def get_weather(city: str) -> str:
        """Today's (made-up) weather for a city."""
        return f"{city}: 21 C, light wind"

    @server.tool()
    def search_docs(query: str) -> list[str]:
        """Search the (tiny) documentation."""
        docs = [
            "agentgw routes MCP, A2A and LLM calls",
            "policies are Casbin rules",
            "audit logs are chained",
        ]
        return [d for d in docs if query.lower() in d.lower()]

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository (the demo policy denies it to everyone)."""
        return f"deleted {name}"

    @server.prompt()
    def summarize(text: str) -> str:
        """Ask for a summary."""
        return f"Summarize in one line: {text}"

    @server.resource("demo://readme")
    def readme() -> str:
        return "agentgw demo upstream"

    return server
