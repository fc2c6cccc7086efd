"""The identity stage: JWT checks, the claims-to-principal mapping, challenges, scopes, API keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agentgw.call import ANONYMOUS, Call, Principal, Reply
from agentgw.errors import InsufficientScope, Unauthenticated, Unavailable
from agentgw.filters.authenticate import Authenticate
from agentgw.oauth.apikeys import ApiKeyStore, ApiKeyVerifier, NewApiKey
from agentgw.oauth.jwks import LocalKeySet, RemoteKeySet
from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from agentgw.oauth.verify import (
    MAX_ACCEPTED_RESOURCES,
    BearerVerifier,
    JwtVerifier,
    TrustedIssuer,
    audience_covers,
    principal_from_claims,
)
from agentgw.storage import make_engine

ISSUER = "http://gw.test"
RESOURCE = "http://gw.test/mcp/github"


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "keys.json")


@pytest.fixture
def verifier(keys: SigningKeys) -> JwtVerifier:
    return JwtVerifier([TrustedIssuer(ISSUER, LocalKeySet(keys))], leeway_s=30)


def mint(keys: SigningKeys, **options: Any) -> str:
    defaults: dict[str, Any] = {"subject": "alice", "audience": RESOURCE, "client_id": "cli"}
    token, _ = mint_token(keys, ISSUER, **(defaults | options))
    return token


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def call(endpoint: str | None = "/mcp/github", credentials: str | None = None) -> Call:
    return Call(
        "mcp", "call", "mcp:github/x", "github", "tools/call", credentials=credentials, endpoint=endpoint
    )


async def reply(_: Call) -> Reply:
    return Reply(payload="ok")


# --- audience ---


@pytest.mark.parametrize(
    ("audience", "resource", "covers"),
    [
        ("http://gw.test/mcp/github", "http://gw.test/mcp/github", True),
        ("http://gw.test/mcp", "http://gw.test/mcp/github", True),
        ("http://gw.test", "http://gw.test/mcp/github", True),
        ("HTTP://GW.test/mcp/", "http://gw.test/mcp/github", True),
        ("http://gw.test/mcp/git", "http://gw.test/mcp/github", False),
        ("http://gw.test/mcp/github", "http://gw.test/mcp", False),
        ("http://gw.test:8080/mcp", "http://gw.test/mcp", False),
        ("https://gw.test/mcp", "http://gw.test/mcp", False),
        ("http://gw.test/mcp?x=1", "http://gw.test/mcp/github", False),
        ("github", "http://gw.test/mcp/github", False),
    ],
)
def test_an_audience_covers_its_own_uri_and_its_path_children_only(
    audience: str, resource: str, covers: bool
) -> None:
    assert audience_covers(audience, resource) is covers


# --- claims ---


def test_a_user_token_maps_to_a_user_principal_with_roles_scopes_and_actors() -> None:
    principal = principal_from_claims(
        {
            "sub": "alice",
            "client_id": "cli",
            "roles": ["dev", "role:ops"],
            "scope": "a b",
            "act": {"sub": "agent-1", "act": {"sub": "agent-0"}},
        },
        ["roles"],
    )
    assert principal == Principal(
        "user:alice",
        "cli",
        ("role:dev", "role:ops"),
        frozenset({"a", "b"}),
        ("client:agent-1", "client:agent-0"),
    )


def test_a_client_credentials_token_maps_to_a_client_principal() -> None:
    assert principal_from_claims({"sub": "ci", "azp": "ci"}, []).subject == "client:ci"


def test_roles_come_from_the_first_configured_claim_present_even_nested() -> None:
    claims = {"sub": "a", "groups": "x y", "realm_access": {"roles": ["kc"]}}
    assert principal_from_claims(claims, ["realm_access.roles", "groups"]).roles == ("role:kc",)
    assert principal_from_claims(claims, ["missing", "groups"]).roles == ("role:x", "role:y")


def test_scp_is_read_when_scope_is_absent() -> None:
    assert principal_from_claims({"sub": "a", "scp": ["r", "w"]}, []).scopes == {"r", "w"}


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"sub": ""},
        {"sub": 7},
        {"sub": "a", "roles": ["bad role"]},
        {"sub": "a", "roles": ["user:alice,x"]},
        {"sub": "a", "act": "agent"},
        {"sub": "a", "act": {"client": "x"}},
    ],
)
def test_claims_without_a_usable_subject_roles_or_act_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(Unauthenticated):
        principal_from_claims(claims, ["roles"])


def test_a_claim_value_cannot_impersonate_another_kind_of_subject() -> None:
    # A role claim holding "user:bob" is still a role, never the subject user:bob.
    principal = principal_from_claims({"sub": "a", "roles": ["user:bob"]}, ["roles"])
    assert principal.roles == ("role:user:bob",) and principal.subject == "user:a"


# --- JWT verification ---


async def test_a_valid_token_is_verified_and_then_served_from_the_cache(
    keys: SigningKeys, verifier: JwtVerifier
) -> None:
    token = mint(keys, scopes=["s"], roles=["dev"])
    principal = await verifier.verify(token, RESOURCE)
    assert (
        principal.subject == "user:alice" and principal.roles == ("role:dev",) and principal.scopes == {"s"}
    )
    keys.rotate()  # would not matter: the verified token is cached until it expires
    assert await verifier.verify(token, RESOURCE) == principal


async def test_the_cached_token_is_still_checked_for_audience_and_expiry(
    keys: SigningKeys, verifier: JwtVerifier
) -> None:
    now = [time.time()]
    verifier.clock = lambda: now[0]
    token = mint(keys, ttl_s=60)
    await verifier.verify(token, RESOURCE)
    with pytest.raises(Unauthenticated, match="not meant for"):
        await verifier.verify(token, "http://gw.test/mcp/other")
    now[0] += 60 + 31
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(token, RESOURCE)


async def test_remembered_audience_checks_stay_bounded_and_never_widen_the_audience(
    keys: SigningKeys, verifier: JwtVerifier
) -> None:
    # Callers choose the endpoints: a token for the /mcp tree used on many servers is remembered for
    # at most MAX_ACCEPTED_RESOURCES of them, and each one is still checked against its audience.
    token = mint(keys, audience="http://gw.test/mcp")
    for n in range(MAX_ACCEPTED_RESOURCES * 3):
        assert (await verifier.verify(token, f"http://gw.test/mcp/s{n}")).subject == "user:alice"
    with pytest.raises(Unauthenticated, match="not meant for"):
        await verifier.verify(token, "http://gw.test/a2a/agent")
    assert len(verifier._cache[token].accepted) == MAX_ACCEPTED_RESOURCES


async def test_tokens_signed_by_a_rotated_out_key_still_verify_while_published(
    keys: SigningKeys, verifier: JwtVerifier
) -> None:
    old = mint(keys)
    keys.rotate()
    new = mint(keys)
    assert jwt.get_unverified_header(old)["kid"] != jwt.get_unverified_header(new)["kid"]
    assert (await verifier.verify(old, RESOURCE)).subject == "user:alice"
    assert (await verifier.verify(new, RESOURCE)).subject == "user:alice"


def forgeries(keys: SigningKeys) -> dict[str, str]:
    now = int(time.time())
    kid = keys.jwks()["keys"][0]["kid"]
    claims = {"iss": ISSUER, "sub": "alice", "aud": RESOURCE, "iat": now, "exp": now + 600}
    stranger = rsa.generate_private_key(65537, 2048)
    pem = jwt.PyJWK(keys.jwks()["keys"][0]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head, body = b64({"alg": "HS256", "kid": kid}), b64(claims)
    hs = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "another audience": mint(keys, audience="http://gw.test/mcp/gitlab"),
        "no audience": jwt.encode(
            {k: v for k, v in claims.items() if k != "aud"}, keys._keys[0].private, "RS256", {"kid": kid}
        ),
        "expired": mint(keys, now=now - 3600, ttl_s=60),
        "not yet valid": mint(keys, now=now + 3600),
        "unknown kid": jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "nope"}),
        "no kid": jwt.encode(claims, stranger, algorithm="RS256"),
        "known kid, other key": jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": kid}),
        "alg none": f"{b64({'alg': 'none'})}.{b64(claims)}.",
        "HS256 with the public key": f"{head}.{body}.{hs}",
        "ES256 header on an RSA kid": jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": kid}),
        "PS256 not allowed here": jwt.encode(
            claims, keys._keys[0].private, algorithm="PS256", headers={"kid": kid}
        ),
        "untrusted issuer": jwt.encode({**claims, "iss": "http://evil"}, stranger, "RS256", {"kid": kid}),
        "no exp": jwt.encode(
            {k: v for k, v in claims.items() if k != "exp"}, keys._keys[0].private, "RS256", {"kid": kid}
        ),
        "garbage": "a.b.c",
        "tampered payload": ".".join(
            [mint(keys).split(".")[0], b64({**claims, "sub": "root"}), mint(keys).split(".")[2]]
        ),
    }


async def test_every_forged_or_stale_token_is_refused(keys: SigningKeys, verifier: JwtVerifier) -> None:
    for case, token in forgeries(keys).items():
        with pytest.raises(Unauthenticated):
            await verifier.verify(token, RESOURCE)
            pytest.fail(case)


async def test_configured_extra_audiences_are_accepted_for_that_issuer_only(keys: SigningKeys) -> None:
    verifier = JwtVerifier([TrustedIssuer(ISSUER, LocalKeySet(keys), audiences=frozenset({"agentgw"}))])
    assert (await verifier.verify(mint(keys, audience="agentgw"), RESOURCE)).subject == "user:alice"


# --- remote JWKS ---


class FakeIdp:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(65537, 2048)
        self.kid = "k1"
        self.fetches = 0
        self.down = False

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid}

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            return httpx.Response(503)
        if request.url.path == "/.well-known/oauth-authorization-server/realm":
            return httpx.Response(
                200, json={"issuer": "https://idp.test/realm", "jwks_uri": "https://idp.test/jwks"}
            )
        if request.url.path == "/jwks":
            self.fetches += 1
            return httpx.Response(200, json={"keys": [self.jwk()]})
        return httpx.Response(404)

    def token(self, kid: str | None = None) -> str:
        now = int(time.time())
        claims = {"iss": "https://idp.test/realm", "sub": "u1", "aud": RESOURCE, "iat": now, "exp": now + 60}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": kid or self.kid})


async def test_a_remote_jwks_is_discovered_cached_and_refetched_on_rotation_at_a_bounded_rate() -> None:
    idp = FakeIdp()
    async with httpx.AsyncClient(transport=httpx.MockTransport(idp.handler)) as http:
        keyset = RemoteKeySet("https://idp.test/realm", None, http, min_refresh_s=60, max_age_s=3600)
        verifier = JwtVerifier([TrustedIssuer("https://idp.test/realm", keyset)])
        assert (await verifier.verify(idp.token(), RESOURCE)).subject == "user:u1"
        assert idp.fetches == 1
        for _ in range(5):  # forged kids: no refetch storm
            with pytest.raises(Unauthenticated):
                await verifier.verify(idp.token(kid="forged"), RESOURCE)
        assert idp.fetches == 1
        idp.key, idp.kid = rsa.generate_private_key(65537, 2048), "k2"  # the IdP rotates
        keyset._fetched_at = time.monotonic() - 61  # ... and the rate bound has passed
        assert (await verifier.verify(idp.token(), RESOURCE)).subject == "user:u1"
        assert idp.fetches == 2


async def test_an_unreachable_idp_keeps_the_last_keys_and_is_unavailable_only_before_any() -> None:
    idp = FakeIdp()
    idp.down = True
    async with httpx.AsyncClient(transport=httpx.MockTransport(idp.handler)) as http:
        keyset = RemoteKeySet(
            "https://idp.test/realm", "https://idp.test/jwks", http, min_refresh_s=0, max_age_s=0
        )
        with pytest.raises(Unavailable):
            await keyset.key("k1")
        idp.down = False
        assert await keyset.key("k1") is not None
        idp.down = True
        assert await keyset.key("k1") is not None


# --- the stage ---


def parse_challenge(exc: Unauthenticated | InsufficientScope) -> dict[str, str]:
    value = exc.headers["WWW-Authenticate"]
    assert value.startswith("Bearer ")
    return {k: v.strip('"') for k, v in (p.split("=", 1) for p in value[7:].split(", "))}


def stage(keys: SigningKeys, *, anonymous: bool = False, scopes: list[str] | None = None) -> Authenticate:
    verifier = JwtVerifier([TrustedIssuer(ISSUER, LocalKeySet(keys))])
    return Authenticate(
        BearerVerifier(verifier, None),
        allow_anonymous=anonymous,
        base_url=ISSUER,
        required_scopes=lambda _: scopes or [],
    )


async def test_no_credentials_get_a_401_naming_the_endpoints_metadata(keys: SigningKeys) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await stage(keys)(call(), reply)
    assert parse_challenge(caught.value) == {
        "resource_metadata": "http://gw.test/.well-known/oauth-protected-resource/mcp/github"
    }


async def test_the_admin_api_and_the_gateway_root_have_their_own_audiences(keys: SigningKeys) -> None:
    authenticate = stage(keys)
    admin_token = mint(keys, audience="http://gw.test/admin")
    assert (await authenticate.principal(f"Bearer {admin_token}")).subject == "user:alice"
    with pytest.raises(Unauthenticated) as caught:
        await authenticate.principal(f"Bearer {mint(keys)}")
    assert parse_challenge(caught.value)["resource_metadata"].endswith("/oauth-protected-resource/admin")
    with pytest.raises(Unauthenticated):  # an ingress that names no endpoint: only gateway-wide tokens
        await authenticate(call(endpoint=None, credentials=f"Bearer {mint(keys)}"), reply)
    root = mint(keys, audience=ISSUER)
    assert (await authenticate(call(endpoint=None, credentials=f"Bearer {root}"), reply)).payload == "ok"


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer   ", "token"])
async def test_a_malformed_authorization_header_is_an_invalid_request(keys: SigningKeys, header: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await stage(keys)(call(credentials=header), reply)
    assert parse_challenge(caught.value)["error"] == "invalid_request"


async def test_a_token_lacking_required_scopes_gets_403_naming_all_of_them(keys: SigningKeys) -> None:
    authenticate = stage(keys, scopes=["repo", "issues"])
    with pytest.raises(InsufficientScope) as caught:
        await authenticate(call(credentials=f"Bearer {mint(keys, scopes=['repo'])}"), reply)
    assert parse_challenge(caught.value) == {
        "error": "insufficient_scope",
        "scope": "issues repo",
        "resource_metadata": "http://gw.test/.well-known/oauth-protected-resource/mcp/github",
    }
    ok = await authenticate(call(credentials=f"Bearer {mint(keys, scopes=['repo', 'issues', 'x'])}"), reply)
    assert ok.payload == "ok"


async def test_anonymous_callers_are_allowed_only_when_configured_and_never_past_scopes(
    keys: SigningKeys,
) -> None:
    seen: list[Principal | None] = []

    async def record(c: Call) -> Reply:
        seen.append(c.principal)
        return Reply()

    await stage(keys, anonymous=True)(call(), record)
    assert seen == [ANONYMOUS]
    with pytest.raises(Unauthenticated) as caught:
        await stage(keys, anonymous=True, scopes=["repo"])(call(), record)
    assert parse_challenge(caught.value)["scope"] == "repo"


async def test_the_principal_keeps_the_token_for_exchange_but_never_shows_it(keys: SigningKeys) -> None:
    token = mint(keys)
    principal = await stage(keys).principal(f"Bearer {token}", call())
    assert principal.credential == token
    assert token not in repr(principal)


async def test_api_keys_are_verified_by_the_key_store_and_revocation_is_immediate(tmp_path: Path) -> None:
    store = ApiKeyStore(make_engine(f"sqlite:///{tmp_path / 'k.db'}"))
    created = store.create(NewApiKey(subject="client:ci", roles=["operator"], scopes=["s"]))
    api = ApiKeyVerifier(store, cache_s=60)
    authenticate = Authenticate(BearerVerifier(None, api), allow_anonymous=False, base_url=ISSUER)
    principal = await authenticate.principal(f"Bearer {created.key}", call())
    assert (principal.subject, principal.client_id, principal.roles) == (
        "client:ci",
        "ci",
        ("role:operator",),
    )
    assert store.revoke(created.id)
    api.forget(created.id)
    with pytest.raises(Unauthenticated):
        await authenticate.principal(f"Bearer {created.key}", call())
    with pytest.raises(Unauthenticated):  # JWTs are not accepted when no issuer is configured
        await authenticate.principal("Bearer a.b.c", call())
