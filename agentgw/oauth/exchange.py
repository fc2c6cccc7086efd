"""RFC 8693 token exchange, both ways: what the built-in STS checks, and how the gateway asks any STS.

Server side (pure functions, used by `agentgw/oauth/server.py`):
    narrowed_scopes   an exchanged token never holds a scope the subject token lacks (unless the
                      client is allowed to add it)
    actor_allowed     `may_act` in the subject token names who may act for its subject (RFC 8693 4.4)
    delegation        the issued `act` claim: the current actor, earlier actors nested inside it

Client side (`TokenEndpoint`): one POST to a token endpoint with the gateway's client authentication
(`client_secret_basic`, `client_secret_post` or `private_key_jwt`), the answer checked, and every
failure mapped to `CredentialError` naming the request that failed and why (HTTP status, OAuth error
code; never a token or a secret). `check_exchanged`: the sanity checks on an exchanged token.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import orjson
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentgw.errors import CredentialError
from agentgw.registry.models import ClientAuth
from agentgw.registry.secrets import Secret

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "CLIENT_ASSERTION_TYPE",
    "ID_JAG_TOKEN_TYPE",
    "JWT_BEARER",
    "MAX_CHAIN",
    "TOKEN_EXCHANGE",
    "TOKEN_TYPES",
    "TokenAnswer",
    "TokenEndpoint",
    "actor_allowed",
    "check_exchanged",
    "delegation",
    "load_private_key",
    "narrowed_scopes",
    "unverified_claims",
]

log = logging.getLogger(__name__)

# URNs, not secrets.
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
ID_JAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"  # noqa: S105
TOKEN_TYPES = {
    "access_token": ACCESS_TOKEN_TYPE,
    "jwt": "urn:ietf:params:oauth:token-type:jwt",
    "id_token": "urn:ietf:params:oauth:token-type:id_token",
}
# The identity stage refuses longer chains, so a longer one could never be used anyway.
MAX_CHAIN = 16
# A token endpoint that says nothing about lifetime: trust the token this long (or its own `exp`).
DEFAULT_LIFETIME_S = 60.0
ASSERTION_LIFETIME_S = 60
MAX_ANSWER_BYTES = 64 * 1024
_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 5.2 error charset
_SIGNING = {"RS256": rsa.RSAPrivateKey, "PS256": rsa.RSAPrivateKey, "ES256": ec.EllipticCurvePrivateKey}


# --- server side -----------------------------------------------------------------------------------


def narrowed_scopes(requested: str | None, held: Collection[str], may_add: Collection[str] = ()) -> list[str]:
    """The scopes of an exchanged token: those asked for (default: all the subject token holds).

    Raises:
        InvalidScopeError: a scope asked for is neither held by the subject token nor one the client
            may add.
    """
    asked = set((requested or "").split())
    if not asked:
        return sorted(held)
    wider = asked - set(held) - set(may_add)
    if wider:
        raise InvalidScopeError(
            f"an exchanged token cannot have scopes the subject token lacks: {' '.join(sorted(wider))}"
        )
    return sorted(asked)


def actor_allowed(may_act: Any, actor: Mapping[str, Any]) -> bool:
    """Whether `actor` (its claims) may act for the subject whose token carries `may_act`.

    No `may_act` allows any actor the server otherwise trusts; a `may_act` allows an actor only if
    every claim it names matches. A malformed one allows nobody (fail closed).
    """
    if may_act is None:
        return True
    if not isinstance(may_act, Mapping) or not may_act:
        return False
    return all(actor.get(name) == value for name, value in may_act.items())


def delegation(actor: Mapping[str, Any], earlier: Any) -> dict[str, Any]:
    """The `act` claim of an exchanged token: the current actor, the subject token's chain inside it.

    Raises:
        InvalidRequestError: the earlier chain is malformed or the result would be too long to use.
    """
    act: dict[str, Any] = dict(actor)
    if earlier is None:
        return act
    depth, link = 0, earlier
    while link is not None:
        if not isinstance(link, Mapping) or not isinstance(link.get("sub"), str):
            raise InvalidRequestError("the subject token's act claim is malformed")
        depth += 1
        link = link.get("act")
    if depth + 1 > MAX_CHAIN:
        raise InvalidRequestError(f"the delegation chain would be longer than {MAX_CHAIN}")
    act["act"] = dict(earlier)
    return act


# --- client side -----------------------------------------------------------------------------------


def load_private_key(pem: str, algorithm: str) -> Any:
    """A PEM private key for signing `private_key_jwt` assertions with `algorithm`.

    Raises:
        ValueError: not a PEM private key, or of a kind `algorithm` cannot use.
    """
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    expected = _SIGNING.get(algorithm, ed25519.Ed25519PrivateKey)
    if not isinstance(key, expected):
        raise ValueError(f"a {type(key).__name__} cannot sign {algorithm}")
    return key


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """A token endpoint's successful answer.

    Attributes:
        access_token: the issued token (never log it).
        issued_token_type: RFC 8693 `issued_token_type`, when the endpoint said.
        lifetime_s: seconds it is valid from now (`expires_in`, else the JWT's `exp`, else a default).
        scope: the scopes granted, when the endpoint said.
    """

    access_token: str
    issued_token_type: str | None
    lifetime_s: float
    scope: str | None


class TokenEndpoint:
    """A token endpoint the gateway is a client of; `request` sends one grant."""

    def __init__(
        self,
        url: str,
        client: ClientAuth,
        secret: Secret,
        http: httpx.AsyncClient,
        *,
        timeout_s: float,
        label: str,
    ) -> None:
        """A token endpoint at `url`; `label` names the upstream in error messages.

        Raises:
            ValueError: `private_key_jwt` with a secret that is not a usable private key.
        """
        self.url = url
        self._client = client
        self._secret = secret
        self._http = http
        self._timeout = timeout_s
        self._label = label
        self._key: Any = None
        if client.method == "private_key_jwt":
            self._key = load_private_key(secret.reveal(), client.algorithm)

    @property
    def client_id(self) -> str:
        return self._client.client_id

    def _authenticate(self, form: dict[str, str], headers: dict[str, str]) -> None:
        client = self._client
        if client.method == "client_secret_basic":
            # RFC 6749 2.3.1: both parts form-urlencoded before the Basic encoding.
            pair = f"{quote(client.client_id, safe='')}:{quote(self._secret.reveal(), safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif client.method == "client_secret_post":
            form["client_id"] = client.client_id
            form["client_secret"] = self._secret.reveal()
        else:
            now = int(time.time())
            claims = {
                "iss": client.client_id,
                "sub": client.client_id,
                "aud": self.url,
                "iat": now,
                "exp": now + ASSERTION_LIFETIME_S,
                "jti": secrets.token_urlsafe(16),
            }
            header = {"kid": client.key_id} if client.key_id else None
            form["client_id"] = client.client_id
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = jwt.encode(
                claims, self._key, algorithm=client.algorithm, headers=header
            )

    async def request(self, grant: Mapping[str, str | None], what: str) -> TokenAnswer:
        """POST `grant` (form fields; `None` values are left out) and return the token.

        Raises:
            CredentialError: the endpoint is unreachable, too slow, refuses (its OAuth error code is
                in the message and in `data`), or answers something that is not a token.
        """
        form = {k: v for k, v in grant.items() if v is not None}
        headers = {"accept": "application/json"}
        self._authenticate(form, headers)
        failed = f"{self._label}: the {what} failed"
        try:
            response = await self._http.post(self.url, data=form, headers=headers, timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise CredentialError(
                f"{failed}: the token service did not answer within {self._timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            # The exception's class says enough (ConnectError, RemoteProtocolError...); its text may
            # hold the URL, which is configuration the caller need not see.
            raise CredentialError(
                f"{failed}: the token service is unreachable ({type(exc).__name__})"
            ) from exc
        body = _json_object(response.content)
        if response.status_code != 200:
            error = body.get("error") if body else None
            code = error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else None
            description = body.get("error_description") if body else None
            # The description may say more than a caller should see; it goes to the log only.
            log.warning(
                "token service refused %s upstream=%s status=%s error=%s description=%s",
                what,
                self._label,
                response.status_code,
                code,
                str(description)[:200] if description else None,
            )
            raise CredentialError(
                f"{failed}: the token service answered HTTP {response.status_code} "
                + (code or "without an OAuth error code"),
                data={"error": code} if code else None,
            )
        token = body.get("access_token") if body else None
        token_type = body.get("token_type") if body else None
        if not body or not isinstance(token, str) or not token or not isinstance(token_type, str):
            raise CredentialError(f"{failed}: the token service answered without a token")
        issued = body.get("issued_token_type")
        scope = body.get("scope")
        return TokenAnswer(
            token,
            issued if isinstance(issued, str) else None,
            _lifetime(body.get("expires_in"), token),
            scope if isinstance(scope, str) else None,
        )


def unverified_claims(token: str) -> dict[str, Any] | None:
    """A JWT's claims read without verifying it (None if it is no JWT): for sanity checks only."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def _scopes_of(claims: Mapping[str, Any]) -> set[str] | None:
    value = claims.get("scope", claims.get("scp"))
    if value is None:
        return None
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    return {"<malformed>"}  # unreadable scopes are not within anything


def check_exchanged(answer: TokenAnswer, subject: str, allowed_scopes: Collection[str]) -> None:
    """Defence in depth on an RFC 8693 answer, whose token is opaque to the gateway by the spec: a token
    service that errs (or is impersonated) must not have the gateway forward a token for another
    subject or with more scopes than asked for.

    The answer's `scope`, and where the token is a JWT its `sub` and `scope`/`scp` claims (read without
    verifying the signature: the upstream verifies it), must name `subject` and stay within
    `allowed_scopes`.

    Raises:
        ValueError: the answer fails a check; the message says which (never a token or a subject).
    """
    allowed = set(allowed_scopes)
    stated = set(answer.scope.split()) if answer.scope is not None else set()
    claims = unverified_claims(answer.access_token)
    if claims is not None:
        if claims.get("sub") != subject:
            raise ValueError("the token does not name the caller as its subject")
        stated |= _scopes_of(claims) or set()
    wider = stated - allowed
    if wider:
        raise ValueError(f"the token has scopes that were not asked for: {' '.join(sorted(wider))}")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > MAX_ANSWER_BYTES:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _lifetime(expires_in: Any, token: str) -> float:
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return float(expires_in)
    try:
        # Unverified on purpose: only to know when to ask again; the upstream verifies the token.
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return DEFAULT_LIFETIME_S
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp) - time.time()
    return DEFAULT_LIFETIME_S
