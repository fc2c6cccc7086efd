"""Identity stage: turns the caller's credentials into a `Principal`, or refuses with a challenge.

The gateway is an OAuth resource server (RFC 9728, RFC 8707); the checks of a bearer credential
(API key or JWT) are `agentgw.oauth.verify`'s, this stage asks them and keeps the answer per call.

A refusal is a 401 whose `WWW-Authenticate` names the endpoint's protected resource metadata; a token
that lacks the scopes the endpoint requires gets 403 `insufficient_scope` naming all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from agentgw.call import ANONYMOUS, Call, Principal, Reply
from agentgw.errors import InsufficientScope, Unauthenticated
from agentgw.oauth.verify import TokenVerifier
from agentgw.pipeline import CallNext

__all__ = ["Authenticate"]


class Authenticate:
    """Bearer credentials go to the verifier; no credentials make `anonymous` only if allowed.

    `required_scopes(call)` names the scopes the called endpoint needs (from the registry).
    """

    def __init__(
        self,
        verifier: TokenVerifier | None,
        *,
        allow_anonymous: bool,
        base_url: str,
        required_scopes: Callable[[Call], Sequence[str]] | None = None,
    ) -> None:
        self._verifier = verifier
        self._allow_anonymous = allow_anonymous
        self._base_url = base_url.rstrip("/")
        self._required_scopes = required_scopes

    @staticmethod
    def endpoint_of(call: Call | None, endpoint: str | None = None) -> str:
        """The gateway path a credential is presented at: `endpoint` if given, else the call's
        endpoint (the gateway root when the ingress set none), else `/admin` (the admin API)."""
        if endpoint is not None:
            return endpoint
        if call is None:
            return "/admin"
        return call.endpoint or ""

    def resource_uri(self, endpoint: str) -> str:
        """The canonical URI of `endpoint` (the RFC 8707 audience a token must carry)."""
        return f"{self._base_url}{endpoint}"

    def metadata_url(self, endpoint: str) -> str:
        """Where the protected resource metadata of `endpoint` is published (RFC 9728 section 3.1)."""
        return f"{self._base_url}/.well-known/oauth-protected-resource{endpoint}"

    def _refuse(
        self, message: str, endpoint: str, error: str | None = None, scopes: Sequence[str] = ()
    ) -> Unauthenticated:
        params = []
        if error is not None:
            params.append(f'error="{error}"')
            # RFC 6750 section 3: printable ASCII without quotes or backslashes; no commas either, for
            # the many parsers that split the challenge on them.
            description = "".join(c if " " <= c <= "~" and c not in '"\\,' else ";" for c in message)
            params.append(f'error_description="{description}"')
        if scopes:
            params.append(f'scope="{" ".join(scopes)}"')
        params.append(f'resource_metadata="{self.metadata_url(endpoint)}"')
        return Unauthenticated(message, headers={"WWW-Authenticate": "Bearer " + ", ".join(params)})

    async def principal(
        self, header: str | None, call: Call | None = None, *, endpoint: str | None = None
    ) -> Principal:
        """The principal behind an `Authorization` header value presented at `endpoint` (a gateway
        path such as `/mcp`; default: the call's endpoint, or `/admin` without a call).

        Raises:
            Unauthenticated: no acceptable credentials; carries the `WWW-Authenticate` challenge.
            Unavailable: a key store the verifier must consult is unreachable.
        """
        path = self.endpoint_of(call, endpoint)
        if not header:
            if not (self._allow_anonymous or (call is not None and call.public)):
                raise self._refuse("authentication required", path, scopes=self._scopes(call))
            return ANONYMOUS
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._refuse("the Authorization header must be 'Bearer <token>'", path, "invalid_request")
        if self._verifier is None:
            raise self._refuse("no token issuer is configured on this gateway", path, "invalid_token")
        try:
            principal = await self._verifier.verify(token, self.resource_uri(path))
        except Unauthenticated as exc:
            # Tokens and keys never appear in messages; the reason is safe to show.
            raise self._refuse(exc.message, path, "invalid_token") from exc
        # Kept for token exchange, never logged or forwarded; a cached JWT's principal carries it.
        return principal if principal.credential == token else replace(principal, credential=token)

    def _scopes(self, call: Call | None) -> list[str]:
        if call is None or self._required_scopes is None:
            return []
        scopes = self._required_scopes(call)
        return sorted(set(scopes)) if scopes else []  # most endpoints need none

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        # An ingress that has verified these credentials at this endpoint already hands the principal
        # on (the MCP pass-through checks credentials before anything else): not verified twice.
        principal = call.principal or await self.principal(call.credentials, call)
        needed = self._scopes(call)
        if needed and not set(needed) <= principal.scopes:
            if principal is ANONYMOUS:
                raise self._refuse("authentication required", self.endpoint_of(call), scopes=needed)
            scope = " ".join(needed)
            raise InsufficientScope(
                f"insufficient scope: this endpoint needs {scope}",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}", '
                    f'resource_metadata="{self.metadata_url(self.endpoint_of(call))}"'
                },
            )
        call.principal = principal
        return await call_next(call)
