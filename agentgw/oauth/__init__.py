"""OAuth for the gateway: protected resource metadata (RFC 9728), the built-in authorization server,
trusted issuers' keys, API keys. `identity.build_identity` assembles them for `agentgw.app`.

Kept import-free: `agentgw/settings.py` imports `agentgw.oauth.config`.
"""
