"""The credentials stage serving A2A agents' static and none modes, as it serves MCP upstreams: the
secret is read once at start-up, sent in the header the agent's declaration names, and cached."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from agentgw.call import Call, Principal, Reply
from agentgw.filters.credentials import CredentialConfigError, Credentials, MemoryTokenCache
from agentgw.registry.a2a import A2aAgentSpec
from agentgw.registry.secrets import Secrets, SecretSource

CARD: dict[str, Any] = {
    "name": "a",
    "supportedInterfaces": [
        {"url": "http://a.test/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
    ],
}


def agent(name: str, **credential: Any) -> A2aAgentSpec:
    return A2aAgentSpec(name=name, card=CARD, credential=credential or {"mode": "none"})


def send(name: str) -> Call:
    call = Call(
        protocol="a2a",
        action="send",
        resource=f"a2a:{name}/s",
        upstream=name,
        method="SendMessage",
        principal=Principal(subject="user:alice", credential="the-callers-token"),
    )
    call.upstream_authorization = "Bearer the-callers-token"  # an earlier stage gone wrong
    return call


async def sent(stage: Credentials, call: Call) -> tuple[str, str] | None:
    seen: list[tuple[str, str] | None] = []

    async def terminal(call: Call) -> Reply:
        value = call.upstream_authorization
        seen.append(None if value is None else (call.upstream_authorization_header, value))
        return Reply()

    await stage(call, terminal)
    return seen[0]


async def test_an_agents_static_secret_is_read_once_and_sent_in_the_header_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("A2A_KEY", "from-env")
    secrets = Secrets({"by-env": SecretSource(env="A2A_KEY"), "by-file": SecretSource(file=key_file)})
    agents = [
        agent("env", mode="static", secret="by-env"),
        agent("file", mode="static", secret="by-file", header="X-Api-Key", scheme=""),
        agent("none"),
    ]
    upstreams = {a.name: a.credentialed() for a in agents}
    stage = Credentials(agents=upstreams.get, secrets=secrets)
    stage.prepare(upstreams.values())
    key_file.write_text("changed\n")
    monkeypatch.setenv("A2A_KEY", "changed")
    assert await sent(stage, send("env")) == ("authorization", "Bearer from-env")
    assert await sent(stage, send("file")) == ("x-api-key", "from-file")
    assert await sent(stage, send("none")) is None
    assert await sent(stage, send("env")) == ("authorization", "Bearer from-env")
    assert isinstance(stage.cache, MemoryTokenCache)
    assert stage.cache.lookups == {("a2a:env", "miss"): 1, ("a2a:env", "hit"): 1, ("a2a:file", "miss"): 1}
    assert "from-env" not in repr(agents[0]), "specs name secrets, never hold them"


async def test_an_mcp_call_after_an_agents_own_header_goes_back_to_authorization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("A2A_KEY", "k")
    upstreams = {"file": agent("file", mode="static", secret="key", header="X-Api-Key").credentialed()}
    stage = Credentials(agents=upstreams.get, secrets=Secrets({"key": SecretSource(env="A2A_KEY")}))
    call = send("file")
    assert await sent(stage, call) == ("x-api-key", "Bearer k")
    call.protocol = "mcp"  # the same call object again, for an upstream the stage does not know
    assert await sent(stage, call) is None
    assert call.upstream_authorization_header == "authorization"


def test_a_missing_agent_secret_stops_start_up_and_says_where_only_in_the_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("A2A_NOPE", raising=False)
    secrets = Secrets({"unset": SecretSource(env="A2A_NOPE"), "absent": SecretSource(file=tmp_path / "gone")})
    cases = [("unset", "A2A_NOPE"), ("absent", "cannot read"), ("undeclared", "unknown secret 'undeclared'")]
    for secret, why in cases:
        stage = Credentials(secrets=secrets)
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(CredentialConfigError, match="upstream 'a2a:a'") as info,
        ):
            stage.prepare([agent("a", mode="static", secret=secret).credentialed()])
        assert why in str(info.value) or why in caplog.text
