"""MCP ingress: both protocol eras on one URL per server, the merged catalog, virtual servers."""
