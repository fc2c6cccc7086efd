"""Load generator: a fixed number of calls at a fixed concurrency against one URL, over keep-alive HTTP.

    python -m bench load URL [--kind mcp|a2a|llm] [--era modern|legacy] [--calls N] [--concurrency C]
                             [--token T] [--client aiohttp|httpx] [--json]

Kinds (each one request shape, sent as raw JSON over HTTP/1.1 keep-alive connections, one per worker):
- `mcp`: `tools/call` of a tool (`echo` by default). `--era modern` (2026-07-28): every request
  carries `params._meta` (protocol version, client info, client capabilities) and the headers
  `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`. `--era legacy` (2025-11-25): each worker sends
  `initialize` and `notifications/initialized` once (not timed), then calls on its `Mcp-Session-Id`.
- `a2a`: A2A 1.0 JSON-RPC `SendMessage` with one text part (`A2A-Version: 1.0`).
- `llm`: OpenAI-style `POST .../chat/completions` (URL is the full endpoint) with one user message.

A call is an error unless it answers HTTP 200 with the JSON-RPC response to that request's id and no
error (MCP: and `isError` false; LLM: a body with `choices`). Latency is from just before the request
is written to the whole answer read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, Protocol

import orjson

__all__ = ["CLIENTS", "KINDS", "Result", "Workload", "main", "run", "workload"]

Kind = Literal["mcp", "a2a", "llm"]
Era = Literal["modern", "legacy"]
KINDS: Final[tuple[Kind, ...]] = ("mcp", "a2a", "llm")
ERAS: Final[tuple[Era, ...]] = ("modern", "legacy")
CLIENTS: Final = ("aiohttp", "httpx")
MODERN: Final = "2026-07-28"
LEGACY: Final = "2025-11-25"
CLIENT_INFO: Final = {"name": "agentgw-bench", "version": "1.0.0"}
TIMEOUT_S: Final = 30.0


@dataclass
class Result:
    """What one run measured. Latencies are in milliseconds."""

    calls: int
    concurrency: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-call latencies."""
        out = asdict(self)
        out.pop("latencies_ms")
        return out


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# --- HTTP clients: one tiny seam so both libraries can be measured against each other ------------------


class Http(Protocol):
    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str, bytes]:
        """Status, content type, `Mcp-Session-Id` (or "") and the body of one POST."""
        ...


class _Aiohttp:
    def __init__(self, session: Any) -> None:
        self._session = session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str, bytes]:
        async with self._session.post(url, data=body, headers=headers) as response:
            data = await response.read()
            return (
                response.status,
                response.headers.get("content-type", ""),
                response.headers.get("mcp-session-id", ""),
                data,
            )


class _Httpx:
    def __init__(self, client: Any) -> None:
        self._client = client

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str, bytes]:
        response = await self._client.post(url, content=body, headers=headers)
        return (
            response.status_code,
            response.headers.get("content-type", ""),
            response.headers.get("mcp-session-id", ""),
            response.content,
        )


@contextlib.asynccontextmanager
async def http_client(kind: str, connections: int, timeout_s: float = TIMEOUT_S) -> AsyncIterator[Http]:
    """A keep-alive HTTP/1.1 client holding up to `connections` connections."""
    if kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        ) as session:
            yield _Aiohttp(session)
    elif kind == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=timeout_s, trust_env=False) as client:
            yield _Httpx(client)
    else:
        raise ValueError(f"unknown client {kind!r}: choose from {', '.join(CLIENTS)}")


# --- workloads: what one call looks like for each kind ------------------------------------------------


def _sse_messages(body: bytes) -> list[Any]:
    out = []
    for line in body.splitlines():
        if line.startswith(b"data:"):
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line[5:]))
    return out


def _jsonrpc_answer(content_type: str, body: bytes, msg_id: int) -> dict[str, Any] | str:
    """The JSON-RPC response to `msg_id` in a JSON or SSE body, or what is wrong with the body."""
    if content_type.startswith("text/event-stream"):
        messages = _sse_messages(body)
    else:
        try:
            messages = [orjson.loads(body)]
        except orjson.JSONDecodeError:
            return f"not JSON: {body[:120]!r}"
    for message in messages:
        if isinstance(message, dict) and message.get("id") == msg_id:
            if "error" in message:
                return f"JSON-RPC error {message['error']}"
            return message
    return f"no response to id {msg_id}: {body[:120]!r}"


class Workload:
    """One kind of call: its per-worker setup (not timed), its request, and its success check."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.headers = {"content-type": "application/json"}
        if token:
            self.headers["authorization"] = f"Bearer {token}"

    async def setup(self, http: Http) -> dict[str, str]:
        """Headers for one worker's calls (a legacy MCP worker opens its session here).

        Raises:
            RuntimeError: the setup exchange failed.
        """
        return self.headers

    def request(self, msg_id: int) -> bytes:
        raise NotImplementedError

    def check(self, status: int, content_type: str, body: bytes, msg_id: int) -> str | None:
        """None if the answer is a success, else a short description of what is wrong."""
        if status != 200:
            return f"HTTP {status}: {body[:160]!r}"
        answer = _jsonrpc_answer(content_type, body, msg_id)
        return answer if isinstance(answer, str) else None


class McpToolCall(Workload):
    def __init__(self, url: str, token: str | None, era: Era, tool: str, arguments: dict[str, Any]) -> None:
        super().__init__(url, token)
        self.era = era
        self.tool = tool
        self.headers["accept"] = "application/json, text/event-stream"
        self.headers["mcp-protocol-version"] = MODERN if era == "modern" else LEGACY
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if era == "modern":
            self.headers["mcp-method"] = "tools/call"
            self.headers["mcp-name"] = tool
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        # Everything but the id is the same for every call: serialize it once.
        self._tail = orjson.dumps({"method": "tools/call", "params": params})[1:]

    async def setup(self, http: Http) -> dict[str, str]:
        if self.era == "modern":
            return self.headers
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": CLIENT_INFO},
        }
        headers = {k: v for k, v in self.headers.items() if k != "mcp-protocol-version"}
        status, content_type, session, body = await http.post(self.url, orjson.dumps(init), headers)
        if (problem := Workload.check(self, status, content_type, body, 0)) is not None:
            raise RuntimeError(f"initialize failed: {problem}")
        if not session:
            raise RuntimeError("initialize answered without an Mcp-Session-Id")
        headers = {**self.headers, "mcp-session-id": session}
        note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        status, _, _, body = await http.post(self.url, note, headers)
        if status != 202:
            raise RuntimeError(f"notifications/initialized answered HTTP {status}: {body[:160]!r}")
        return headers

    def request(self, msg_id: int) -> bytes:
        return b'{"jsonrpc":"2.0","id":%d,' % msg_id + self._tail

    def check(self, status: int, content_type: str, body: bytes, msg_id: int) -> str | None:
        if status != 200:
            return f"HTTP {status}: {body[:160]!r}"
        answer = _jsonrpc_answer(content_type, body, msg_id)
        if isinstance(answer, str):
            return answer
        result = answer.get("result")
        if not isinstance(result, dict) or result.get("isError"):
            return f"tool error: {str(result)[:160]}"
        return None


class A2aSendMessage(Workload):
    def __init__(self, url: str, token: str | None) -> None:
        super().__init__(url, token)
        self.headers["a2a-version"] = "1.0"

    def request(self, msg_id: int) -> bytes:
        message = {"messageId": f"bench-{msg_id}", "role": "ROLE_USER", "parts": [{"text": "hello"}]}
        return orjson.dumps(
            {"jsonrpc": "2.0", "id": msg_id, "method": "SendMessage", "params": {"message": message}}
        )


class LlmChat(Workload):
    def __init__(self, url: str, token: str | None, model: str) -> None:
        super().__init__(url, token)
        self._body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]})

    def request(self, msg_id: int) -> bytes:
        return self._body

    def check(self, status: int, content_type: str, body: bytes, msg_id: int) -> str | None:
        if status != 200:
            return f"HTTP {status}: {body[:160]!r}"
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return f"not JSON: {body[:120]!r}"
        return None if isinstance(answer, dict) and answer.get("choices") else f"no choices: {body[:120]!r}"


def workload(
    kind: Kind,
    url: str,
    *,
    era: Era = "modern",
    token: str | None = None,
    tool: str = "echo",
    model: str = "bench",
) -> Workload:
    """The workload for `kind` against `url`.

    Raises:
        ValueError: unknown kind or era.
    """
    if era not in ERAS:
        raise ValueError(f"unknown era {era!r}: choose from {', '.join(ERAS)}")
    if kind == "mcp":
        return McpToolCall(url, token, era, tool, {"text": "hello"})
    if kind == "a2a":
        return A2aSendMessage(url, token)
    if kind == "llm":
        return LlmChat(url, token, model)
    raise ValueError(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")


# --- the run ---------------------------------------------------------------------------------------------


async def run(
    load: Workload,
    calls: int,
    concurrency: int,
    *,
    client: str = "aiohttp",
    http: Http | None = None,
    stop_on_error: bool = False,
) -> Result:
    """Send `calls` calls with `concurrency` workers, each on its own keep-alive connection.

    With `stop_on_error` the workers stop at the first failed call (a warm-up against a broken
    target then fails within one request timeout, not after all its calls).

    Raises:
        RuntimeError: a worker's setup (e.g. a legacy `initialize`) failed.
    """
    if calls < 1 or concurrency < 1:
        raise ValueError("calls and concurrency must be at least 1")
    concurrency = min(concurrency, calls)
    if http is None:
        async with http_client(client, concurrency) as own:
            return await run(load, calls, concurrency, http=own)
    worker_headers = await asyncio.gather(*(load.setup(http) for _ in range(concurrency)))
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    next_id = itertools.count(1)
    clock = time.perf_counter

    async def worker(headers: dict[str, str]) -> None:
        nonlocal errors, first_error
        post: Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, str, str, bytes]]] = http.post
        url = load.url
        while (msg_id := next(next_id)) <= calls and not (stop_on_error and errors):
            body = load.request(msg_id)
            started = clock()
            try:
                status, content_type, _, answer = await post(url, body, headers)
            except Exception as exc:  # every failure is a counted error, never the end of the run
                latencies.append((clock() - started) * 1000)
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            latencies.append((clock() - started) * 1000)
            problem = load.check(status, content_type, answer, msg_id)
            if problem is not None:
                errors += 1
                first_error = first_error or problem

    started = clock()
    await asyncio.gather(*(worker(h) for h in worker_headers))
    seconds = clock() - started
    ordered = sorted(latencies)
    calls = len(latencies)
    return Result(
        calls=calls,
        concurrency=concurrency,
        errors=errors,
        seconds=round(seconds, 4),
        calls_per_s=round(calls / seconds, 1),
        p50_ms=round(percentile(ordered, 0.50), 3),
        p90_ms=round(percentile(ordered, 0.90), 3),
        p99_ms=round(percentile(ordered, 0.99), 3),
        first_error=first_error,
        latencies_ms=latencies,
    )


def install_uvloop() -> None:
    """Use uvloop for the load generator when it is installed: the client's own overhead is noise."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the endpoint, e.g. http://127.0.0.1:8080/mcp/bench")
    parser.add_argument("--kind", choices=KINDS, default="mcp")
    parser.add_argument("--era", choices=ERAS, default="modern", help="MCP protocol era (kind mcp)")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", "-c", type=int, default=10)
    parser.add_argument("--token", help="bearer token for the Authorization header")
    parser.add_argument("--tool", default="echo", help="tool to call (kind mcp)")
    parser.add_argument("--model", default="bench", help="model name (kind llm)")
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    """`python -m bench load`: one run, printed."""
    install_uvloop()
    load = workload(args.kind, args.url, era=args.era, token=args.token, tool=args.tool, model=args.model)
    result = asyncio.run(run(load, args.calls, args.concurrency, client=args.client))
    if args.json:
        sys.stdout.write(orjson.dumps(result.summary()).decode() + "\n")
    else:
        print(
            f"{result.calls} calls at c={result.concurrency} in {result.seconds:.2f}s: "
            f"{result.calls_per_s:.0f} calls/s, p50 {result.p50_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, "
            f"p99 {result.p99_ms:.3f} ms, errors {result.errors}"
        )
        if result.first_error:
            print(f"first error: {result.first_error}")
    return 1 if result.errors else 0
