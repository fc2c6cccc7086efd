"""A2A agent card signatures (A2A 1.0 `signatures`: JWS over the RFC 8785 canonical form of the card
without its `signatures` field): upstream cards verified against the keys configured per agent, the
cards the gateway serves signed with the built-in authorization server's key (docs/decisions/0403).

The canonical form is a2a-sdk's (`a2a.utils.signing`): the card read as the A2A protobuf `AgentCard`
(0.3 fields mapped to 1.0 ones, unknown fields dropped), written as JSON with empty values removed, then
JCS. That is what a2a-sdk agents sign and a2a-sdk clients verify.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import orjson
from a2a.client.card_resolver import parse_agent_card
from a2a.types import AgentCard
from a2a.utils.signing import (
    SignatureVerificationError,
    create_agent_card_signer,
    create_signature_verifier,
)
from cryptography.hazmat.primitives import serialization
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWKError, PyJWKSetError, PyJWTError

from agentgw.errors import ConfigError
from agentgw.oauth.keys import ALGORITHM, SigningKeys
from agentgw.registry.a2a import A2aAgentSpec, CardFetcher, CardSignatureInvalid

__all__ = ["CardSigner", "UpstreamCardVerifier", "card_signer", "read_card"]

log = logging.getLogger(__name__)

# Signed served cards by content: callers see a few distinct cards (one per set of allowed skills).
MAX_SIGNED_CARDS = 1024


def read_card(document: Mapping[str, Any]) -> AgentCard:
    """The card as a2a-sdk reads it (the form its signatures cover).

    Raises:
        CardSignatureInvalid: it cannot be read as an A2A card.
    """
    try:
        # parse_agent_card rewrites 0.3 fields in place: give it a copy.
        return parse_agent_card(copy.deepcopy(dict(document)))
    except Exception as exc:  # protobuf's ParseError, or whatever a malformed field raises: unreadable
        raise CardSignatureInvalid(f"the agent card cannot be read as an A2A card: {exc}") from exc


class UpstreamCardVerifier:
    """Checks a fetched card's signatures against the agent's `card_keys` (an `A2aRegistry` verify hook).

    No `card_keys`: signatures are not checked (and say nothing; the served card drops them), logged
    once per fetch. With them: one signature must verify; an unsigned card is refused unless
    `card_keys.required` is off.
    """

    def __init__(self, fetch: CardFetcher) -> None:
        self._fetch = fetch

    async def __call__(self, spec: A2aAgentSpec, document: Mapping[str, Any]) -> None:
        """Verify `document`, the card just fetched for `spec`.

        Raises:
            CardSignatureInvalid: no signature verifies, the keys cannot be had, or a required one is missing.
        """
        keys = spec.card_keys
        signed = bool(document.get("signatures"))
        if keys is None:
            if signed:
                log.warning(
                    "agent card of %s is signed but no card_keys are configured: signature not verified",
                    spec.name,
                )
            return
        if not signed:
            if keys.required:
                raise CardSignatureInvalid(
                    "the agent card carries no signature, and its card_keys require one"
                )
            return
        keyset = await self._keyset(spec)
        card = read_card(document)

        def key_for(kid: str | None, _jku: str | None) -> PyJWK:
            # The card's own `jku` is ignored: only the configured keys count.
            if kid is not None:
                for key in keyset.keys:
                    if key.key_id == kid:
                        return key
                raise PyJWKError(f"no configured card key has kid {kid!r}")
            if len(keyset.keys) == 1:
                return keyset.keys[0]
            raise PyJWKError("the signature names no kid and several card keys are configured")

        try:
            create_signature_verifier(key_for, list(keys.algorithms))(card)
        except SignatureVerificationError as exc:
            raise CardSignatureInvalid(
                "no signature on the agent card verifies with its card_keys (tampered, or another key)"
            ) from exc

    async def _keyset(self, spec: A2aAgentSpec) -> PyJWKSet:
        keys = spec.card_keys
        assert keys is not None
        if keys.jwks is not None:
            jwks: object = keys.jwks
        else:
            assert keys.jwks_uri is not None
            try:
                jwks = await self._fetch(keys.jwks_uri, spec.timeout_s)
            except Exception as exc:  # any failure: the card cannot be verified, so it is refused
                raise CardSignatureInvalid(
                    f"the card keys at {keys.jwks_uri} could not be fetched: {exc}"
                ) from exc
        try:
            if not isinstance(jwks, dict):
                raise PyJWKSetError("not a JSON object")
            return PyJWKSet.from_dict(jwks)
        except PyJWTError as exc:
            raise CardSignatureInvalid(f"the configured card keys are not a usable JWK set: {exc}") from exc


class CardSigner:
    """Signs the cards the gateway serves with the built-in authorization server's current key; the
    protected header names its `kid` and, as `jku`, the JWKS at `<base>/oauth/jwks`."""

    def __init__(self, keys: SigningKeys, jwks_url: str) -> None:
        self._keys = keys
        self._jwks_url = jwks_url
        self._signed: dict[tuple[str, str], dict[str, Any]] = {}

    def sign(self, card: Mapping[str, Any]) -> dict[str, Any]:
        """`card` with one signature, the gateway's, in `signatures` (any other removed).

        Raises:
            CardSignatureInvalid: the card cannot be read as an A2A card, so it cannot be signed.
        """
        unsigned = {k: v for k, v in card.items() if k != "signatures"}
        kid, private = self._keys.current()
        digest = hashlib.sha256(orjson.dumps(unsigned, option=orjson.OPT_SORT_KEYS)).hexdigest()
        signature = self._signed.get((kid, digest))
        if signature is None:
            pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            signer = create_agent_card_signer(
                pem, {"kid": kid, "alg": ALGORITHM, "jku": self._jwks_url, "typ": "JOSE"}
            )
            made = signer(read_card(unsigned)).signatures[-1]
            signature = {"protected": made.protected, "signature": made.signature}
            if len(self._signed) >= MAX_SIGNED_CARDS:
                self._signed.pop(next(iter(self._signed)))
            self._signed[(kid, digest)] = signature
        return {**unsigned, "signatures": [signature]}


def card_signer(enabled: bool | None, keys: SigningKeys | None, base_url: str) -> CardSigner | None:
    """The signer for served cards: `enabled` None means on when the built-in server (its keys) is.

    Raises:
        ConfigError: signing is on but the built-in authorization server is off (no key to sign with).
    """
    if enabled is None:
        enabled = keys is not None
    if not enabled:
        return None
    if keys is None:
        raise ConfigError("a2a_sign_cards needs the built-in authorization server (auth.builtin.enabled)")
    return CardSigner(keys, f"{base_url.rstrip('/')}/oauth/jwks")
