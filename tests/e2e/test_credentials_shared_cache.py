"""Exchanged tokens shared by two gateway nodes through Redis: one exchange serves both, no caller
gets another's token, a token an upstream refused is evicted for every node, an entry that does not
decrypt is ignored and replaced, and a node whose Redis is gone still works by exchanging.

Real parts: the authlib STS fixture (the IdP, which also issues the callers' tokens), a validating
MCP upstream, two `agentgw serve` processes on one Redis key prefix of their own (node b reaches
Redis through a proxy the test breaks).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from agentgw.oauth.exchange import TOKEN_EXCHANGE
from conformance.fixtures import mcp_protected_upstream, sts
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import gateway_args, write_config
from tests.support.mcp import META, answer_of, modern_headers
from tests.support.proxy import TcpProxy

IDP_SECRET = "idp-client-secret-5b0e"
CACHE_SECRET = "token-cache-key-4f1c9a7e2b6d8c0e3a5f7b9d1c3e5a7f"
PUBLIC_URL = "http://gateway.test"
REDIS_PORT = 6379


@dataclass
class Nodes:
    a: FixtureProcess
    b: FixtureProcess  # reaches Redis through `proxy`
    proxy: TcpProxy
    idp: str
    upstream: str
    prefix: str
    redis: redis.Redis
    metrics: dict[str, str]  # node url -> its /metrics

    def token(self, subject: str) -> str:
        answer = httpx.post(
            f"{self.idp}/_fixture/mint",
            json={"sub": subject, "aud": f"{PUBLIC_URL}/mcp/pay", "scope": "payments", "roles": ["staff"]},
        )
        token: str = answer.json()["access_token"]
        return token

    def call(self, node: FixtureProcess, token: str) -> dict[str, Any]:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}, "_meta": META},
        }
        headers = modern_headers("tools/call", "whoami") | {"authorization": f"Bearer {token}"}
        return answer_of(httpx.post(f"{node.url}/mcp/pay", json=body, headers=headers, timeout=30))

    def subject_seen(self, node: FixtureProcess, token: str) -> str:
        answer = self.call(node, token)
        assert "result" in answer, answer
        claims: dict[str, Any] = json.loads(answer["result"]["content"][0]["text"])
        sub: str = claims["sub"]
        return sub

    def exchanges(self, subject: str) -> int:
        records = httpx.get(f"{self.idp}/_fixture/requests").json()
        return sum(1 for r in records if r["grant_type"] == TOKEN_EXCHANGE and r["subject"] == subject)

    def actor_tokens(self) -> int:
        records = httpx.get(f"{self.idp}/_fixture/requests").json()
        return sum(1 for r in records if r["grant_type"] == "client_credentials")

    def sent_upstream(self) -> list[str]:
        records = httpx.get(f"{self.upstream}/_fixture/received").json()
        return [r["authorization"] for r in records]

    def value(self, key: bytes) -> bytes | None:
        found = self.redis.get(key)
        assert found is None or isinstance(found, bytes)
        return found

    def evicted(self, node: FixtureProcess) -> float:
        """How many tokens `node` dropped from memory because another node saw them refused."""
        text = httpx.get(self.metrics[node.url]).text
        found = re.search(r'agentgw_token_cache_lookups_total\{result="evicted",upstream="pay"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    def entries(self) -> set[bytes]:
        return {
            k if isinstance(k, bytes) else k.encode() for k in self.redis.scan_iter(match=f"{self.prefix}*")
        }


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    tmp = tmp_path_factory.mktemp("shared-cache")
    idp_port, up_port = free_port(), free_port()
    idp, upstream = f"http://127.0.0.1:{idp_port}", f"http://127.0.0.1:{up_port}/mcp"
    clients = {
        "clients": [
            {
                "client_id": "gateway",
                "secret": IDP_SECRET,
                "audiences": [upstream],
                "grant_types": ["client_credentials", TOKEN_EXCHANGE],
            }
        ]
    }
    (tmp / "idp.json").write_text(json.dumps(clients))
    prefix = f"agentgw-test:{uuid.uuid4().hex}:token:"
    client = redis.Redis(port=REDIS_PORT)
    env = {"AGW_E2E_IDP_SECRET": IDP_SECRET, "AGW_E2E_TOKEN_CACHE": CACHE_SECRET}

    def config(redis_port: int, metrics_port: int) -> dict[str, Any]:
        return {
            "public_url": PUBLIC_URL,
            "metrics": {"port": metrics_port},
            "redis_url": f"redis://127.0.0.1:{redis_port}/0",
            "token_cache": {"secret": "token-cache", "redis_prefix": prefix, "timeout_s": 0.5},
            "auth": {"issuers": [{"issuer": idp}], "builtin": {"enabled": False}},
            "policy": {"rules": ["p, role:staff, mcp:*, *, allow"]},
            "secrets": {
                "idp-secret": {"env": "AGW_E2E_IDP_SECRET"},
                "token-cache": {"env": "AGW_E2E_TOKEN_CACHE"},
            },
            "servers": [
                {
                    "name": "pay",
                    "url": upstream,
                    "credential": {
                        "mode": "token_exchange",
                        "token_url": f"{idp}/token",
                        "client": {"client_id": "gateway", "secret": "idp-secret"},
                        "scopes": ["payments"],
                    },
                }
            ],
        }

    with ExitStack() as stack:
        stack.callback(client.close)
        stack.callback(lambda: [client.delete(key) for key in client.scan_iter(match=f"{prefix}*")])
        proxy = stack.enter_context(TcpProxy(REDIS_PORT))
        stack.enter_context(start_process(sts.command(idp_port, str(tmp / "idp.json")), idp_port))
        protected = mcp_protected_upstream.command(
            up_port, issuers=[idp], actors=["gateway"], scopes=["payments"]
        )
        stack.enter_context(start_process(protected, up_port))
        started, metrics = [], {}
        for name, redis_port in (("a", REDIS_PORT), ("b", proxy.port)):
            (tmp / name).mkdir()
            port, metrics_port = free_port(), free_port()
            written = write_config(tmp / name, config(redis_port, metrics_port))
            args = gateway_args(written, port, f"sqlite:///{tmp / name / 'agentgw.db'}")
            started.append(stack.enter_context(start_process(args, port, env=env)))
            metrics[started[-1].url] = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Nodes(
            started[0], started[1], proxy, idp, upstream.removesuffix("/mcp"), prefix, client, metrics
        )


@pytest.fixture(autouse=True)
def fresh(nodes: Nodes) -> Iterator[None]:
    for base in (nodes.idp, nodes.upstream):
        httpx.post(f"{base}/_fixture/reset").raise_for_status()
    yield
    nodes.proxy.resume()


def behave(nodes: Nodes, **behaviour: Any) -> None:
    httpx.post(f"{nodes.idp}/_fixture/behaviour", json=behaviour).raise_for_status()


def test_one_exchange_serves_every_node(nodes: Nodes) -> None:
    token = nodes.token("alice")
    seen = [nodes.subject_seen(node, token) for node in (nodes.a, nodes.b, nodes.a, nodes.b)]
    assert seen == ["alice"] * 4
    assert nodes.exchanges("alice") == 1
    assert nodes.actor_tokens() <= 1  # the gateway's actor token is shared too
    assert len(set(nodes.sent_upstream())) == 1


def test_the_cache_holds_no_token_and_no_caller_in_clear(nodes: Nodes) -> None:
    token = nodes.token("clear")
    before = nodes.entries()
    nodes.subject_seen(nodes.a, token)
    [sent] = nodes.sent_upstream()
    assert nodes.entries() - before, "nothing was cached in Redis"
    stored = b"".join(nodes.value(key) or b"" for key in nodes.entries() - before)
    names = b"".join(nodes.entries())
    for secret in (sent.removeprefix("Bearer ").encode(), token.encode(), b"clear"):
        assert secret[:24] not in stored and secret[:24] not in names


@pytest.mark.parametrize("planted", ["another callers entry", "garbage"])
def test_an_entry_that_does_not_decrypt_for_its_name_is_ignored_and_replaced(
    nodes: Nodes, planted: str
) -> None:
    victim, intruder = f"victim-{planted[0]}", f"intruder-{planted[0]}"
    victim_token, intruder_token = nodes.token(victim), nodes.token(intruder)
    known = nodes.entries()
    nodes.subject_seen(nodes.a, victim_token)
    [victims] = nodes.entries() - known
    nodes.subject_seen(nodes.a, intruder_token)
    [intruders] = nodes.entries() - known - {victims}
    # The victim's token, copied under the intruder's name: it opens only under its own name.
    value = nodes.redis.get(victims) if planted == "another callers entry" else b"\x00garbage"
    assert value is not None
    nodes.redis.set(intruders, value, px=60_000)

    assert nodes.subject_seen(nodes.b, intruder_token) == intruder  # b has nothing in memory for it
    assert nodes.exchanges(intruder) == 2
    assert nodes.redis.get(intruders) not in (None, value)  # replaced by b's own
    victim_sent = nodes.sent_upstream()[0]
    assert nodes.sent_upstream()[1:].count(victim_sent) == 0


def test_a_token_the_upstream_refused_is_evicted_for_every_node(nodes: Nodes) -> None:
    token = nodes.token("dave")
    known = nodes.entries()
    nodes.subject_seen(nodes.a, token)
    [entry] = nodes.entries() - known
    [refused] = nodes.sent_upstream()
    # The upstream refuses the token on a, and the STS will not replace it: a's call fails ...
    httpx.post(f"{nodes.upstream}/_fixture/reject", json={"count": 1}).raise_for_status()
    behave(nodes, exchange="invalid_grant", times=1)
    assert "error" in nodes.call(nodes.a, token)
    # ... and the refused token is gone for b too: b obtains a token of its own.
    assert nodes.redis.get(entry) is None
    assert nodes.subject_seen(nodes.b, token) == "dave"
    assert nodes.sent_upstream()[-1] != refused
    assert nodes.exchanges("dave") == 3


def test_a_token_refused_on_one_node_leaves_the_memory_of_every_node(nodes: Nodes) -> None:
    token = nodes.token("erin")
    nodes.subject_seen(nodes.a, token)
    nodes.subject_seen(nodes.b, token)  # b holds a's token in memory now
    [refused, also_b] = nodes.sent_upstream()
    assert refused == also_b
    dropped = nodes.evicted(nodes.b)
    httpx.post(f"{nodes.upstream}/_fixture/reject", json={"count": 1}).raise_for_status()
    assert nodes.subject_seen(nodes.a, token) == "erin"  # refused, then a fresh token
    deadline = time.monotonic() + 10
    while nodes.evicted(nodes.b) == dropped:
        assert time.monotonic() < deadline, "b was not told that the token was refused"
        time.sleep(0.02)
    assert nodes.subject_seen(nodes.b, token) == "erin"
    received = httpx.get(f"{nodes.upstream}/_fixture/received").json()
    assert [r["status"] for r in received] == [200, 200, 401, 200, 200]
    replacement = received[3]["authorization"]
    assert replacement != refused and received[4]["authorization"] == replacement
    assert nodes.exchanges("erin") == 2  # b took a's replacement from Redis


@pytest.mark.parametrize("fault", ["refuse", "pause"])
def test_a_node_whose_redis_is_gone_still_serves_by_exchanging(nodes: Nodes, fault: str) -> None:
    token = nodes.token(f"offline-{fault}")
    getattr(nodes.proxy, fault)()
    assert nodes.subject_seen(nodes.b, token) == f"offline-{fault}"
    assert nodes.subject_seen(nodes.b, token) == f"offline-{fault}"  # its memory still serves
    assert nodes.exchanges(f"offline-{fault}") == 1
    nodes.proxy.resume()
    # Back: what b obtains now serves a as well.
    later = nodes.token(f"back-{fault}")
    assert nodes.subject_seen(nodes.b, later) == nodes.subject_seen(nodes.a, later) == f"back-{fault}"
    assert nodes.exchanges(f"back-{fault}") == 1
