"""The operators' web console at /console: audit explorer, policy workbench, registry and budgets.

Server-rendered pages (Jinja2 with autoescape, plain HTML forms, one vendored stylesheet, no
JavaScript), logged into through the built-in authorization server with the authorization code flow
and PKCE, as its own public client `agentgw-console`. The access token it gets (audience
`<base>/admin`, the admin API's) is the session: kept in an HttpOnly, SameSite=Strict cookie (Secure
when the gateway's URL is https) and verified on every request as the admin API verifies a bearer
token, so a page needs exactly the grant its admin API route needs (`admin:audit` read, ...), a
revoked user or an expired token is out at once, and any node behind a load balancer serves it.

Every POST carries a CSRF token derived from the session token (HMAC), which a page of another
origin can neither read nor compute. Every page is sent with a strict Content-Security-Policy (no
script at all, styles and forms only from the gateway itself), and every caller-chosen value is
shown escaped twice over: HTML-escaped by the template engine and made printable (`printable`)
so that control and bidi characters in audit data cannot reorder or hide what is shown.
"""

from agentgw.console.routes import CONSOLE_CLIENT_ID, Console, ConsoleSettings, console_router, console_static

__all__ = ["CONSOLE_CLIENT_ID", "Console", "ConsoleSettings", "console_router", "console_static"]
