"""The LLM ingress in-process (ASGI) in front of the real OpenAI-compatible fixture on 127.0.0.1.

The pipeline is the real identity and policy stages with two in-test stages around them: `Outcomes`
in the audit slot and `Ledger` in the budget slot, which record what each stage is told (estimate,
settled usage, release) so that reservations can be shown never to leak. The real budget stage is
exercised at the end.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.types import Message

from agentgw.call import Call, Principal, Reply, Usage
from agentgw.errors import ConfigError, GatewayError, Unauthenticated, Unavailable
from agentgw.filters.authenticate import Authenticate
from agentgw.filters.authorize import Authorize, CasbinAuthorizer
from agentgw.filters.budget import Budget, StaticRules
from agentgw.filters.credentials import Credentials
from agentgw.ingress.llm import LlmIngress, estimate_tokens
from agentgw.pipeline import CallNext, Filter, ordered
from agentgw.records.budget import BudgetRule, targets
from agentgw.registry.llm import LlmRouteSpec, token_upstreams
from agentgw.registry.secrets import Secrets, SecretSource
from agentgw.settings import PACKAGE_POLICIES
from agentgw.storage import make_engine
from agentgw.storage.budget import SqlBudgetStore
from conformance.fixtures.launch import free_port
from conformance.fixtures.openai_upstream import start_openai_upstream_sync

ROUTE_SECRET = "route-secret-7f3a"
POLICY = [
    "p, user:alice, llm:*, *, allow",
    "p, user:alice, llm:secret, *, deny",
    "p, user:bob, llm:chat, *, allow",
]
# Per million tokens.
IN_PRICE, OUT_PRICE = 2.0, 8.0
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


# --- in-test stages ----------------------------------------------------------------------------------


@dataclass
class Entry:
    call: Call
    estimate: Usage
    settled: list[Usage] = field(default_factory=list)
    released: int = 0
    status: str | None = None


@dataclass
class Ledger:
    """Budget slot: records each call's estimate and how its reservation ended (settled or released)."""

    entries: list[Entry] = field(default_factory=list)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        entry = Entry(call, call.estimate)
        self.entries.append(entry)
        try:
            reply = await call_next(call)
        except BaseException:
            entry.released += 1
            raise
        if reply.streaming:

            async def settle(usage: Usage) -> None:
                entry.settled.append(usage)
                entry.status = reply.status

            reply.on_settle(settle)
        else:
            assert reply.usage is not None, "a finished reply must say what it consumed"
            entry.settled.append(reply.usage)
            entry.status = reply.status
        return reply

    def only(self) -> Entry:
        assert len(self.entries) == 1, self.entries
        return self.entries[0]


@dataclass
class Outcomes:
    """Audit slot: what each call ended as (its upstream as the pipeline saw it, or the error reason)."""

    seen: list[tuple[str, str, str]] = field(default_factory=list)

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        try:
            reply = await call_next(call)
        except GatewayError as exc:
            self.seen.append((call.resource, call.upstream, exc.reason))
            raise
        self.seen.append((call.resource, call.upstream, reply.status))
        return reply


class Tokens:
    """Fixed bearer tokens for two users (the identity stage's `TokenVerifier`)."""

    async def verify(self, credential: str, resource: str) -> Principal:
        users = {"alice-token": "user:alice", "bob-token": "user:bob"}
        if credential not in users:
            raise Unauthenticated("unknown token")
        return Principal(subject=users[credential])


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with start_openai_upstream_sync() as url:
        yield url


@pytest.fixture
def received(upstream: str) -> Iterator[Any]:
    httpx.post(f"{upstream}/_fixture/reset")

    def read() -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{upstream}/_fixture/received").json()
        return records

    yield read


def book(secret_file: Path) -> Secrets:
    return Secrets({"route-key": SecretSource(file=secret_file)})


def routes(upstream: str, secret_file: Path) -> list[LlmRouteSpec]:
    api = f"{upstream}/v1"
    static = {"mode": "static", "secret": "route-key"}

    def route(name: str, model: str, **extra: Any) -> LlmRouteSpec:
        fields: dict[str, Any] = {"name": name, "base_url": api, "model": model, "credential": static}
        fields |= {"input_price": IN_PRICE, "output_price": OUT_PRICE}
        return LlmRouteSpec.model_validate(fields | extra)

    return [
        route("chat", "fixture-chat", default_max_tokens=100),
        route("secret", "fixture-chat"),
        route("embed", "fixture-embed"),
        route("quiet", "nousage-model"),
        route("reject", "reject-model"),
        route("garbage", "garbage-model"),
        route("cut", "cut-model"),
        route("stall", "stall-model", timeout_s=0.3),
        route("slow", "slow-model", timeout_s=0.3),
        route("flaky", "fail-model", fallbacks=["slow", "cheap"]),
        route("cheap", "fixture-chat", input_price=1.0, output_price=1.0),
        route("down", "fixture-chat", base_url=f"http://127.0.0.1:{free_port()}/v1"),
        route("doomed", "fail-model", fallbacks=["down"]),
        route("off", "fixture-chat", enabled=False),
        route(
            "cc",
            "fixture-chat",
            credential={
                "mode": "client_credentials",
                "token_url": f"{upstream}/_fixture/token",
                "client_id": "gw",
                "secret": "route-key",
            },
        ),
    ]


@dataclass
class Gateway:
    app: Starlette
    ledger: Ledger
    outcomes: Outcomes
    http: httpx.AsyncClient

    def client(self, user: str = "alice") -> openai.AsyncOpenAI:
        """The official client, in-process, with `user`'s bearer token."""
        transport = httpx2.ASGITransport(app=self.app)
        return openai.AsyncOpenAI(
            base_url="http://gw/v1",
            api_key=f"{user}-token",
            http_client=httpx2.AsyncClient(transport=transport),
            max_retries=0,
        )


_stages: list[Credentials] = []


@pytest.fixture(autouse=True)
async def close_stages() -> AsyncIterator[None]:
    # A stage that fetched a token holds an HTTP client: closed after each test.
    yield
    while _stages:
        await _stages.pop().aclose()


def credentials_for(specs: Sequence[LlmRouteSpec], secrets: Secrets | None) -> Credentials:
    """The credentials stage serving `specs` (as the app builds it): secrets read now."""
    served = token_upstreams(specs)
    stage = Credentials(models=served.get, secrets=secrets)
    stage.prepare(served.values())
    _stages.append(stage)
    return stage


def pipeline_with(
    budget: Filter, outcomes: Outcomes, specs: Sequence[LlmRouteSpec] = (), secrets: Secrets | None = None
) -> Any:
    authorizer = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, POLICY)
    return ordered(
        audit=outcomes,
        authenticate=Authenticate(Tokens(), allow_anonymous=False, base_url="http://gw"),
        authorize=Authorize(authorizer),
        budget=budget,
        credentials=credentials_for(specs, secrets),
    )


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "route.key"
    path.write_text(ROUTE_SECRET + "\n")
    return path


@pytest.fixture
async def gateway(upstream: str, secret_file: Path) -> AsyncIterator[Gateway]:
    ledger, outcomes = Ledger(), Outcomes()
    specs = routes(upstream, secret_file)
    ingress = LlmIngress.build(
        specs, pipeline_with(ledger, outcomes, specs, book(secret_file)), max_body_bytes=64 * 1024
    )
    app = Starlette(routes=ingress.routes())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        yield Gateway(app, ledger, outcomes, http)
    await ingress.aclose()


def cost(prompt: int, completion: int, in_price: float = IN_PRICE, out_price: float = OUT_PRICE) -> float:
    return (prompt * in_price + completion * out_price) / 1_000_000


def prompt_estimate(messages: Sequence[Any]) -> int:
    return estimate_tokens(messages, messages=len(messages))


# --- chat completions -----------------------------------------------------------------------------------


async def test_a_completion_reaches_the_provider_model_with_the_routes_credential_never_the_callers(
    gateway: Gateway, received: Any
) -> None:
    answer = await gateway.client().chat.completions.create(model="chat", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.model == "chat"  # the virtual name, not the provider's
    [record] = received()
    assert record["body"]["model"] == "fixture-chat"
    assert record["authorization"] == f"Bearer {ROUTE_SECRET}"
    assert "alice-token" not in str(record)


async def test_cost_is_the_providers_usage_times_the_route_prices(gateway: Gateway) -> None:
    answer = await gateway.client().chat.completions.create(model="chat", messages=HELLO)
    assert answer.usage is not None
    entry = gateway.ledger.only()
    [usage] = entry.settled
    assert usage.tokens == answer.usage.total_tokens == 5
    assert usage.cost == pytest.approx(cost(answer.usage.prompt_tokens, answer.usage.completion_tokens))
    assert gateway.outcomes.seen == [("llm:chat", "chat", "ok")]


async def test_the_estimate_reserves_the_prompt_plus_max_tokens_or_the_routes_default(
    gateway: Gateway,
) -> None:
    client = gateway.client()
    await client.chat.completions.create(model="chat", messages=HELLO, max_tokens=50)
    await client.chat.completions.create(model="chat", messages=HELLO, max_completion_tokens=7, n=2)
    await client.chat.completions.create(model="chat", messages=HELLO)
    prompt = prompt_estimate(HELLO)
    estimates = [e.estimate for e in gateway.ledger.entries]
    assert [e.tokens for e in estimates] == [prompt + 50, prompt + 14, prompt + 100]
    assert estimates[0].cost == pytest.approx(cost(prompt, 50))


async def test_the_agent_run_id_header_names_the_calls_run(gateway: Gateway) -> None:
    await gateway.client().chat.completions.create(
        model="chat",
        messages=HELLO,
        extra_headers={"Agent-Run-Id": "run-42"},
    )
    call = gateway.ledger.only().call
    assert (call.protocol, call.action, call.resource, call.run_id) == ("llm", "call", "llm:chat", "run-42")


async def test_a_provider_without_usage_is_charged_by_count(gateway: Gateway) -> None:
    answer = await gateway.client().chat.completions.create(model="quiet", messages=HELLO)
    assert answer.usage is None
    [usage] = gateway.ledger.only().settled
    completion = math.ceil(len("echo: hello there") / 4)
    assert usage.tokens == prompt_estimate(HELLO) + completion
    assert usage.cost == pytest.approx(cost(prompt_estimate(HELLO), completion))


# --- streaming --------------------------------------------------------------------------------------------


async def test_a_stream_is_relayed_and_settled_once_from_the_usage_chunk_the_gateway_asked_for(
    gateway: Gateway, received: Any
) -> None:
    stream = await gateway.client().chat.completions.create(
        model="chat",
        messages=HELLO,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert all(c.choices and c.usage is None for c in chunks), "the client did not ask for usage"
    assert {c.model for c in chunks} == {"chat"}
    [record] = received()
    assert record["body"]["stream_options"] == {"include_usage": True}
    entry = gateway.ledger.only()
    [usage] = entry.settled
    assert (usage.calls, usage.tokens, entry.status) == (1, 5, "ok")
    assert usage.cost == pytest.approx(cost(2, 3))


async def test_a_client_that_asks_for_usage_gets_the_usage_chunk(gateway: Gateway) -> None:
    stream = await gateway.client().chat.completions.create(
        model="chat",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


async def test_a_stream_without_provider_usage_is_counted_and_the_client_still_gets_a_usage_chunk(
    gateway: Gateway,
) -> None:
    stream = await gateway.client().chat.completions.create(
        model="quiet",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    [usage] = gateway.ledger.only().settled
    completion = math.ceil(len("echo: hello there") / 4)
    assert usage.tokens == prompt_estimate(HELLO) + completion
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == usage.tokens


async def test_a_stream_cut_midway_ends_with_a_clear_error_and_settles_what_went_by(gateway: Gateway) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three four five"}]
    stream = await gateway.client().chat.completions.create(
        model="cut",
        messages=messages,
        stream=True,
    )
    got: list[str] = []
    with pytest.raises(openai.APIError, match="broke off the stream"):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "echo: one"
    entry = gateway.ledger.only()
    assert entry.released == 0
    [usage] = entry.settled
    completion = math.ceil(len("echo: one") / 4)
    assert usage.tokens == prompt_estimate(messages) + completion
    assert usage.cost == pytest.approx(cost(prompt_estimate(messages), completion))
    assert entry.status == "upstream_error"


async def test_a_stalled_stream_ends_with_a_timeout_error(gateway: Gateway) -> None:
    stream = await gateway.client().chat.completions.create(
        model="stall",
        messages=HELLO,
        stream=True,
    )
    with pytest.raises(openai.APIError, match="stalled"):
        async for _ in stream:
            pass
    entry = gateway.ledger.only()
    assert len(entry.settled) == 1 and entry.status == "upstream_timeout"


async def test_a_client_that_goes_away_mid_stream_still_settles_and_frees_the_provider(
    gateway: Gateway,
) -> None:
    app = gateway.app
    body = b'{"model": "stall", "stream": true, "messages": [{"role": "user", "content": "a b c"}]}'
    first_chunk = anyio.Event()
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer alice-token")],
        "client": ("127.0.0.1", 1),
        "server": ("gw", 80),
    }
    with anyio.fail_after(5):  # the stalled provider would hold the stream for 10 s
        await app(scope, receive, send)
    entry = gateway.ledger.only()
    assert len(entry.settled) == 1 and entry.status == "client_closed"


# --- discovery and policy ---------------------------------------------------------------------------------


async def test_models_lists_only_what_the_caller_may_list(gateway: Gateway) -> None:
    alice = sorted([m.id async for m in gateway.client("alice").models.list()])
    bob = [m.id async for m in gateway.client("bob").models.list()]
    assert "secret" not in alice and "off" not in alice
    assert {"chat", "embed", "cc", "flaky"} <= set(alice)
    assert bob == ["chat"]
    assert gateway.ledger.entries[0].call.action == "list"


async def test_a_denied_model_is_refused_with_403_and_never_reaches_the_provider(
    gateway: Gateway, received: Any
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client().chat.completions.create(model="secret", messages=HELLO)
    assert caught.value.status_code == 403
    assert caught.value.body == {
        "message": "denied by policy: user:alice may not call llm:secret",
        "type": "permission_error",
        "param": None,
        "code": "denied_by_policy",
    }
    assert received() == []
    assert gateway.ledger.entries == []  # refused before the budget stage: nothing reserved


async def test_an_unknown_model_is_404_when_allowed_and_looks_like_a_denied_one_otherwise(
    gateway: Gateway,
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await gateway.client("alice").chat.completions.create(model="nope", messages=HELLO)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    [entry] = gateway.ledger.entries
    assert entry.released == 1  # the reservation went back

    bob = gateway.http
    headers = {"authorization": "Bearer bob-token"}
    denied = await bob.post(
        "/v1/chat/completions", json={"model": "secret", "messages": HELLO}, headers=headers
    )
    absent = await bob.post(
        "/v1/chat/completions", json={"model": "nope", "messages": HELLO}, headers=headers
    )
    assert denied.status_code == absent.status_code == 403
    # The same words, naming what was asked for: nothing tells the two apart but the name sent.
    assert "llm:secret" in denied.text and denied.text == absent.text.replace("llm:nope", "llm:secret")


async def test_retrieving_a_hidden_model_looks_exactly_like_an_unknown_one(gateway: Gateway) -> None:
    headers = {"authorization": "Bearer alice-token"}
    hidden = await gateway.http.get("/v1/models/secret", headers=headers)
    absent = await gateway.http.get("/v1/models/nope", headers=headers)
    disabled = await gateway.http.get("/v1/models/off", headers=headers)
    assert hidden.status_code == absent.status_code == disabled.status_code == 404
    assert hidden.json()["error"]["message"].replace("secret", "X") == absent.json()["error"][
        "message"
    ].replace("nope", "X")
    model = await gateway.client().models.retrieve("chat")
    assert model.id == "chat"


async def test_a_caller_with_a_bad_token_gets_401_with_the_challenge(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client("mallory").chat.completions.create(model="chat", messages=HELLO)
    assert caught.value.status_code == 401
    assert "resource_metadata=" in caught.value.response.headers["www-authenticate"]
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "authentication_error"


# --- upstream failures ----------------------------------------------------------------------------------


async def test_a_slow_provider_gives_504_and_the_reservation_is_released(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.client().chat.completions.create(model="slow", messages=HELLO)
    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_timeout"
    entry = gateway.ledger.only()
    assert (entry.released, entry.settled) == (1, [])


async def test_an_unreachable_provider_gives_502_and_the_reservation_is_released(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.client().chat.completions.create(model="down", messages=HELLO, stream=True)
    assert caught.value.status_code == 502
    assert "unreachable" in caught.value.message
    assert gateway.ledger.only().released == 1


async def test_a_failing_route_falls_back_past_a_slow_one_and_the_serving_route_is_charged(
    gateway: Gateway, received: Any
) -> None:
    answer = await gateway.client().chat.completions.create(model="flaky", messages=HELLO)
    assert answer.model == "flaky"
    assert [r["body"]["model"] for r in received()] == ["fail-model", "slow-model", "fixture-chat"]
    [usage] = gateway.ledger.only().settled
    assert usage.cost == pytest.approx(cost(2, 3, 1.0, 1.0))  # the fallback's prices
    assert gateway.outcomes.seen == [("llm:flaky", "cheap", "ok")]


async def test_when_every_route_fails_the_client_gets_502_saying_so(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError, match="every fallback failed") as caught:
        await gateway.client().chat.completions.create(model="doomed", messages=HELLO)
    assert caught.value.status_code == 502


async def test_a_provider_refusal_is_relayed_with_its_status_and_costs_nothing(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="reject", messages=HELLO)
    assert caught.value.param == "messages"
    entry = gateway.ledger.only()
    assert entry.settled == [Usage(calls=1, tokens=0, cost=0.0)] and entry.status == "upstream_400"


async def test_a_provider_answering_garbage_gives_502(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.client().chat.completions.create(model="garbage", messages=HELLO)
    assert caught.value.status_code == 502


# --- bad input --------------------------------------------------------------------------------------------

JSON = {"content-type": "application/json", "authorization": "Bearer alice-token"}


@pytest.mark.parametrize(
    ("content", "headers", "status", "code", "param"),
    [
        (b'{"model": "chat", "messages": [', JSON, 400, "parse_error", None),
        (b"[1, 2]", JSON, 400, "invalid_request", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', JSON, 400, "invalid_request", "model"),
        (b'{"model": 7, "messages": []}', JSON, 400, "invalid_request", "model"),
        (b'{"model": "chat"}', JSON, 400, "invalid_request", "messages"),
        (b'{"model": "chat", "messages": []}', JSON, 400, "invalid_request", "messages"),
        (
            b'{"model": "chat", "messages": [{}], "max_tokens": "9"}',
            JSON,
            400,
            "invalid_request",
            "max_tokens",
        ),
        (b'{"model": "chat", "messages": [{}], "max_tokens": 0}', JSON, 400, "invalid_request", "max_tokens"),
        (b'{"model": "chat", "messages": [{}], "stream": "yes"}', JSON, 400, "invalid_request", "stream"),
        (b'{"model": "GPT/4*", "messages": [{}]}', JSON, 404, "model_not_found", "model"),
        (b'{"model": "chat", "messages": [{}]}', JSON | {"content-type": "text/plain"}, 415, None, None),
        (b'{"model": "chat", "messages": ["' + b"x" * 70_000 + b'"]}', JSON, 413, None, None),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "missing-model",
        "model-not-a-string",
        "missing-messages",
        "empty-messages",
        "max-tokens-not-int",
        "max-tokens-zero",
        "stream-not-bool",
        "impossible-model-name",
        "wrong-content-type",
        "oversized",
    ],
)
async def test_bad_input_gets_an_openai_shaped_4xx_and_reserves_nothing(
    gateway: Gateway,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    response = await gateway.http.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert gateway.ledger.entries == []


async def test_bad_embeddings_input_gets_a_400(gateway: Gateway) -> None:
    response = await gateway.http.post("/v1/embeddings", json={"model": "embed", "input": ""}, headers=JSON)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


# --- embeddings and client credentials ------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float", None], ids=["float", "client-default-base64"])
async def test_embeddings_come_back_in_the_requested_encoding_and_cost_input_tokens(
    gateway: Gateway, received: Any, encoding: str | None
) -> None:
    options: dict[str, Any] = {"encoding_format": encoding} if encoding else {}
    answer = await gateway.client().embeddings.create(model="embed", input=["one two", "three"], **options)
    [record] = received()
    assert record["body"]["encoding_format"] == (encoding or "base64")
    assert answer.model == "embed"
    assert [d.embedding for d in answer.data] == [[7.0, 0.0, 0.5, -0.5], [5.0, 1.0, 0.5, -0.5]]
    [usage] = gateway.ledger.only().settled
    assert usage.tokens == 3 and usage.cost == pytest.approx(cost(3, 0))


async def test_a_client_credentials_route_sends_one_fetched_token_for_many_calls(
    gateway: Gateway, received: Any
) -> None:
    client = gateway.client()
    for _ in range(2):
        await client.chat.completions.create(model="cc", messages=HELLO)
    records = received()
    token_requests = [r for r in records if r["path"] == "/_fixture/token"]
    assert len(token_requests) == 1
    assert token_requests[0]["authorization"].startswith("Basic ")
    chats = [r["authorization"] for r in records if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 2 and len(set(chats)) == 1 and chats[0].startswith("Bearer cc-gw-")


class FailsOnTheWayBack:
    """Audit slot that cannot record the outcome: the answer must not go out, nor anything leak."""

    async def __call__(self, call: Call, call_next: CallNext) -> Reply:
        await call_next(call)
        raise Unavailable("audit log unavailable")


async def test_a_stream_refused_on_its_way_back_is_closed_and_settled_before_the_error(
    upstream: str, secret_file: Path
) -> None:
    ledger = Ledger()
    authorizer = CasbinAuthorizer(PACKAGE_POLICIES / "model.conf", None, POLICY)
    pipeline = ordered(
        audit=FailsOnTheWayBack(),
        authenticate=Authenticate(Tokens(), allow_anonymous=False, base_url="http://gw"),
        authorize=Authorize(authorizer),
        budget=ledger,
        credentials=credentials_for(routes(upstream, secret_file), book(secret_file)),
    )
    ingress = LlmIngress.build(routes(upstream, secret_file), pipeline, max_body_bytes=1024)
    app = Starlette(routes=ingress.routes())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        response = await http.post(
            "/v1/chat/completions", json={"model": "chat", "messages": HELLO, "stream": True}, headers=JSON
        )
    await ingress.aclose()
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    entry = ledger.only()
    assert len(entry.settled) == 1 and entry.status == "unavailable"


async def test_a_route_whose_secret_is_missing_stops_start_up(tmp_path: Path) -> None:
    spec = LlmRouteSpec(
        name="chat",
        base_url="http://127.0.0.1:1/v1",
        model="m",
        credential={"mode": "static", "secret": "unset"},
    )
    secrets = Secrets({"unset": SecretSource(env="LLM_TEST_UNSET_KEY")})
    with pytest.raises(ConfigError, match=r"upstream 'llm:chat'.*secret 'unset'"):
        pipeline_with(Ledger(), Outcomes(), [spec], secrets)


async def test_a_routes_secret_is_read_once_at_start_up_not_per_call(
    upstream: str, received: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_TEST_ROUTE_KEY", "sk-at-start")
    spec = LlmRouteSpec(
        name="chat",
        base_url=f"{upstream}/v1",
        model="fixture-chat",
        credential={"mode": "static", "secret": "route"},
    )
    secrets = Secrets({"route": SecretSource(env="LLM_TEST_ROUTE_KEY")})
    ingress = LlmIngress.build(
        [spec], pipeline_with(Ledger(), Outcomes(), [spec], secrets), max_body_bytes=64 * 1024
    )
    monkeypatch.setenv("LLM_TEST_ROUTE_KEY", "sk-changed-later")
    app = Starlette(routes=ingress.routes())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            body = {"model": "chat", "messages": HELLO}
            answer = await http.post("/v1/chat/completions", json=body, headers=JSON)
    finally:
        await ingress.aclose()
    assert answer.status_code == 200, answer.text
    assert [r["authorization"] for r in received()] == ["Bearer sk-at-start"]


# --- the real budget stage --------------------------------------------------------------------------------


async def budget_gateway(
    upstream: str, secret_file: Path, tmp_path: Path, rule: BudgetRule
) -> tuple[LlmIngress, httpx.AsyncClient, SqlBudgetStore]:
    store = SqlBudgetStore(make_engine(f"sqlite:///{tmp_path / 'budget.db'}"))
    budget = Budget(store, StaticRules([rule]))
    specs = routes(upstream, secret_file)
    ingress = LlmIngress.build(
        specs, pipeline_with(budget, Outcomes(), specs, book(secret_file)), max_body_bytes=64 * 1024
    )
    app = Starlette(routes=ingress.routes())
    return ingress, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"), store


async def test_a_spent_token_budget_is_429_with_retry_after_in_openai_shape(
    upstream: str, secret_file: Path, tmp_path: Path
) -> None:
    rule = BudgetRule(name="alice-hourly", per="subject", window="hour", tokens=110)
    ingress, http, _ = await budget_gateway(upstream, secret_file, tmp_path, rule)
    # Each call reserves 7 + 100 tokens and settles at 5: the second asks for 107 more with 5 spent.
    request = {"model": "chat", "messages": HELLO, "max_tokens": 100}
    async with http:
        first = await http.post("/v1/chat/completions", json=request, headers=JSON)
        second = await http.post("/v1/chat/completions", json=request, headers=JSON)
    await ingress.aclose()
    assert first.status_code == 200
    assert second.status_code == 429
    assert int(second.headers["retry-after"]) >= 1
    error = second.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert "alice-hourly" in error["message"]


async def test_a_fallback_chain_that_reached_a_provider_is_charged_though_the_last_was_down(
    upstream: str, secret_file: Path, tmp_path: Path
) -> None:
    # `doomed` fails with a 500 (the provider got the request), then its fallback `down` cannot be
    # reached: the call may have been worked on, so it stays charged. `down` alone is given back.
    rule = BudgetRule(name="one-call", per="run", calls=1)
    ingress, http, _ = await budget_gateway(upstream, secret_file, tmp_path, rule)
    async with http:
        statuses = {}
        for model in ("down", "doomed"):
            headers = JSON | {"agent-run-id": f"run-{model}"}
            statuses[model] = [
                (
                    await http.post(
                        "/v1/chat/completions", json={"model": model, "messages": HELLO}, headers=headers
                    )
                ).status_code
                for _ in range(2)
            ]
    await ingress.aclose()
    assert statuses == {"down": [502, 502], "doomed": [502, 429]}


async def test_a_runs_token_counter_holds_what_was_settled_after_a_cut_stream_not_the_reservation(
    upstream: str, secret_file: Path, tmp_path: Path
) -> None:
    rule = BudgetRule(name="run-tokens", per="run", tokens=10_000)
    ingress, http, store = await budget_gateway(upstream, secret_file, tmp_path, rule)
    headers = JSON | {"agent-run-id": "run-7"}
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three four five"}]
    async with http:
        ok = await http.post(
            "/v1/chat/completions", json={"model": "chat", "messages": HELLO}, headers=headers
        )
        cut = await http.post(
            "/v1/chat/completions",
            json={"model": "cut", "messages": messages, "stream": True, "max_tokens": 500},
            headers=headers,
        )
        slow = await http.post(
            "/v1/chat/completions", json={"model": "slow", "messages": HELLO}, headers=headers
        )
    await ingress.aclose()
    assert ok.status_code == 200 and cut.status_code == 200 and slow.status_code == 504
    assert b'"code":"upstream_error"' in cut.content and b"[DONE]" not in cut.content
    [target] = targets([rule], Principal("user:alice"), "run-7", "llm:chat", 0.0)
    key = target.key("tokens")
    used = await store.used([key])
    cut_tokens = prompt_estimate(messages) + math.ceil(len("echo: one") / 4)
    # The cut stream settled what it used; the slow call may have reached the provider, which may
    # have spent on it: its whole reservation stays charged.
    slow_reserved = prompt_estimate(HELLO) + LlmRouteSpec.model_fields["default_max_tokens"].default
    assert used[key] == 5 + cut_tokens + slow_reserved
