"""Identity stage: turns the caller's credentials into a `Principal`, or refuses with a challenge."""

from __future__ import annotations

from typing import Protocol

from agentgw.call import ANONYMOUS, Call, Principal, Reply
from agentgw.errors import Unauthenticated
from agentgw.pipeline import CallNext

__all__ = ["Authenticate", "TokenVerifier"]


class TokenVerifier(Protocol):
    """Checks a bearer credential; returns the principal or raises `Unauthenticated`."""

    async def verify(self, credential: str, call: Call | None) -> Principal: ...


class Authenticate:
    """Bearer credentials go to the verifiers; no credentials make `anonymous` only if allowed."""

    def __init__(self, verifier: TokenVerifier | None, *, allow_anonymous: bool, challenge: str) -> None:
        self._verifier = verifier
        self._allow_anonymous = allow_anonymous
        self._challenge = challenge

    def _refuse(self, message: str, error: str | None = None) -> Unauthenticated:
        value = self._challenge if error is None else f'{self._challenge}, error="{error}"'
        return Unauthenticated(message, headers={"WWW-Authenticate": value})

    async def principal(self, header: str | None, call: Call | None = None) -> Principal:
        """The principal behind an `Authorization` header value (also used by the admin API).

        Raises:
            Unauthenticated: no acceptable credentials; carries the `WWW-Authenticate` challenge.
        """
        if not header:
            if not self._allow_anonymous:
                raise self._refuse("authentication required")
            return ANONYMOUS
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse("the Authorization header must be 'Bearer <token>'", "invalid_request")
        if self._verifier is None:
            raise self._refuse("no token issuer is configured on this gateway", "invalid_token")
        return await self._verifier.verify(token.strip(), call)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        call.principal = await self.principal(call.credentials, call)
        return await call_next(call)
