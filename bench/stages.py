"""What each pipeline stage costs on its own: the same gateway, one stage switched off at a time.

    python -m bench stages                         # 30 rounds of 300 calls per configuration
    python -m bench stages --calls 1000 --rounds 5 --no-bridge

The gateway is built in this process as `agentgw serve` builds it (`create_app`, its lifespan
running), from `bench compare`'s config: a JWT from the built-in issuer, the Casbin policy, a
budget rule, the audit log with its default durability, metrics; the fast fixture upstream
(bench/upstream.py) runs in its own process on 127.0.0.1, so its CPU is not counted. Modern-era
`tools/call` requests go one after another straight into the ASGI app (no HTTP server, no client:
a dict scope and two callables), to `/mcp/bench` (pass-through) and `/mcp` (the bridge, tool
`bench__echo`).

Configurations, each against `all` (every stage on):
- `-identity`: no `Authorization` header on a gateway that also admits anonymous callers (a
  config the product has), so no JWT is verified; everything else runs as before;
- `-policy`, `-budget`, `-credentials`: that stage replaced by one that passes the call on;
- `-audit`: the audit stage and its durable decision record (the admission hook) replaced so;
- `-metrics`: the pipeline's observer removed (the runner's timing and the counters);
- `-upstream` (pass-through only): the upstream client answered by a stand-in that returns the
  fixture's answer without any I/O; what remains of `all` is the gateway's own work;
- `ingress` (pass-through only): every stage, the hook, metrics and the upstream replaced: the front
  door, the MCP ingress's parse, classify and render, and the pipeline runner.

The switching is done to this process's objects only (the pipeline's filter tuple, its hook and
observer, the pass-through's upstream client); the product has no switch that turns a security
stage off. Rounds alternate every configuration so that a machine shared with other work loads
them alike (short rounds, many of them: the load moves within seconds, and each configuration is
priced against the `all` of its own round). The numbers are this process's CPU time per call,
every thread's (the audit log's writer thread and the budget ledger's saver count), each round
closed by a short settle so that work a round queued is charged to it; the audit writer thread's
part is also shown on its own (its CPU clock), since the loop's and the thread's work would be
made cheaper in different ways.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from bench.compare import SERVER, SUBJECT, TOOL, gateway_setup, upstream_args
from bench.load import McpToolCall, install_uvloop
from conformance.fixtures.launch import free_port, start_process

__all__ = ["BRIDGE_CONFIGS", "CONFIGS", "Bench", "main", "measure"]

CONFIGS: Final = (
    "all",
    "-identity",
    "-policy",
    "-budget",
    "-credentials",
    "-audit",
    "-metrics",
    "-upstream",
    "ingress",
)
# The bridge's upstream is an SDK client session, not the client a stand-in replaces.
BRIDGE_CONFIGS: Final = tuple(c for c in CONFIGS if c not in ("-upstream", "ingress"))
# `-identity` keeps the stage: a caller without credentials is what takes its work away.
STAGE_OF: Final = {"-audit": 0, "-policy": 2, "-budget": 3, "-credentials": 4}
# Long enough for the audit log's ingest thread (every 50 ms) to store what a round wrote.
SETTLE_S: Final = 0.15
# The audit log's thread that stores what the event loop journals (agentgw/storage/audit/sink.py).
WRITER_THREAD: Final = "audit-writer"
# Every call carries the same id, so that the stand-in upstream's one answer fits every call.
MSG_ID: Final = 1

Scope = dict[str, Any]
Message = Mapping[str, Any]


class _Pass:
    """A stage that passes the call on: what a switched-off stage is replaced with."""

    def __init__(self, name: str) -> None:
        self.__name__ = name  # the metrics' stage label stays the replaced stage's

    async def __call__(self, call: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        return await call_next(call)


class _Answer:
    """The fixture upstream's answer to a modern `tools/call`, as `UpstreamResponse` hands it over."""

    max_answer_bytes = 4 * 1024 * 1024

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.headers = {"content-type": "application/json", "content-length": str(len(body))}
        self.url = "http://stand-in/mcp"
        self._body = body

    async def aread(self) -> bytes:
        return self._body

    async def aclose(self) -> None:
        return None

    async def as_stream(self) -> None:
        return None


class _StandIn:
    """An upstream client that answers every request with what the fixture answers, without I/O."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def send(self, *args: Any, **kwargs: Any) -> _Answer:
        return _Answer(self._body)


@dataclass
class Target:
    name: str  # "gateway" (pass-through) or "bridge"
    path: str
    headers: list[tuple[bytes, bytes]]
    anonymous_headers: list[tuple[bytes, bytes]]
    load: McpToolCall


class Bench:
    """A gateway built in this process, and the switches the measurement turns."""

    def __init__(self, app: Any, port: int, token: str, fixture_answer: bytes) -> None:
        self.app = app
        self.gateway = app.state.gateway
        self.port = port
        pipeline = self.gateway.pipeline
        self._filters = pipeline.filters
        self._admitted = pipeline.admitted
        self._observer = pipeline.observer
        self._upstream = self.gateway.passthrough._upstream
        self._stand_in = _StandIn(fixture_answer)
        self.targets = [
            self._target("gateway", f"/mcp/{SERVER}", TOOL, token),
            self._target("bridge", "/mcp", f"{SERVER}__{TOOL}", token),
        ]

    def _target(self, name: str, path: str, tool: str, token: str) -> Target:
        load = McpToolCall(f"http://127.0.0.1:{self.port}{path}", None, "modern", tool, {"text": "hello"})
        base = [(b"host", f"127.0.0.1:{self.port}".encode()), (b"content-type", b"application/json")]
        base += [(k.encode(), v.encode()) for k, v in load.headers.items()]
        bearer = [(b"authorization", f"Bearer {token}".encode())]
        return Target(name, path, base + bearer, base, load)

    def configure(self, config: str) -> None:
        """Switch the gateway to `config` (one of `CONFIGS`), from whatever it was."""
        pipeline = self.gateway.pipeline
        filters = list(self._filters)
        admitted, observer, upstream = self._admitted, self._observer, self._upstream
        if config in STAGE_OF:
            index = STAGE_OF[config]
            filters[index] = _Pass(pipeline.stages[index])
        if config == "-audit":
            admitted = None
        if config == "-metrics":
            observer = None
        if config in ("-upstream", "ingress"):
            upstream = self._stand_in
        if config == "ingress":
            filters = [_Pass(name) for name in pipeline.stages[: len(filters)]]
            admitted, observer = None, None
        pipeline.filters = tuple(filters)
        pipeline.admitted = admitted
        pipeline.observer = observer
        self.gateway.passthrough._upstream = upstream

    async def call(self, target: Target, msg_id: int, anonymous: bool) -> None:
        """One `tools/call` through the ASGI app.

        Raises:
            RuntimeError: the gateway did not answer the call with the tool's result.
        """
        body = target.load.request(msg_id)
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": target.path,
            "raw_path": target.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": target.anonymous_headers if anonymous else target.headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", self.port),
            "state": {},
        }
        done = asyncio.Event()
        given = False
        status = 0
        chunks: list[bytes] = []
        content_type = ""

        async def receive() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # as a server does: nothing more until the client goes away
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value.decode()
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        await self.app(scope, receive, send)
        done.set()
        problem = target.load.check(status, content_type, b"".join(chunks), msg_id)
        if problem is not None:
            raise RuntimeError(f"{target.name}: {problem}")


def _fixture_answer(msg_id: int) -> bytes:
    result = {
        "content": [{"type": "text", "text": "hello"}],
        "isError": False,
        "resultType": "complete",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "bench-upstream", "version": "1.0.0"}},
    }
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result})


def _writer_seconds() -> float:
    """CPU time of the audit log's writer thread (which stores the records the loop journals)."""
    thread = next((t for t in threading.enumerate() if t.name == WRITER_THREAD), None)
    if thread is None or thread.ident is None:
        return 0.0  # not started yet: nothing written
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


async def _round(bench: Bench, target: Target, config: str, calls: int) -> tuple[float, float]:
    """This process's CPU per call over one round, and the audit writer thread's share of it."""
    bench.configure(config)
    anonymous = config == "-identity"
    # This process's CPU time, every thread's; the wall clock would count other work on the machine.
    started, writer = time.process_time(), _writer_seconds()
    for _ in range(calls):
        try:
            await bench.call(target, MSG_ID, anonymous)
        except RuntimeError as exc:
            raise RuntimeError(f"{config}: {exc}") from exc
    await asyncio.sleep(SETTLE_S)
    return (time.process_time() - started) / calls, (_writer_seconds() - writer) / calls


def _configs(target: Target) -> tuple[str, ...]:
    return CONFIGS if target.name == "gateway" else BRIDGE_CONFIGS


Rounds = dict[str, dict[str, list[tuple[float, float]]]]


async def measure(bench: Bench, calls: int, rounds: int, bridge: bool = True) -> Rounds:
    """Seconds of CPU per call, per target and configuration, one figure per round: the process's,
    and the audit writer thread's part of it."""
    targets = bench.targets if bridge else bench.targets[:1]
    for target in targets:  # warm up every path and every configuration
        for config in _configs(target):
            await _round(bench, target, config, max(calls // 10, 20))
    out: Rounds = {t.name: {c: [] for c in _configs(t)} for t in targets}
    for n in range(rounds):
        for target in targets:
            configs = _configs(target)
            # Each round starts one configuration later: none always follows the same one.
            for config in configs[n % len(configs) :] + configs[: n % len(configs)]:
                out[target.name][config].append(await _round(bench, target, config, calls))
    bench.configure("all")
    return out


@contextlib.asynccontextmanager
async def running_bench(work_dir: Path, upstream_url: str) -> AsyncIterator[Bench]:
    """The gateway of `bench compare`'s config, built and started in this process."""
    from agentgw.app import create_app
    from agentgw.identity import signing_keys
    from agentgw.oauth.server import mint_token
    from agentgw.settings import load_settings

    port = free_port()  # only named: nothing listens, requests go straight into the app
    setup = gateway_setup(upstream_url, port)
    config = setup.config | {"allow_anonymous": True}  # `-identity` calls without credentials
    settings = load_settings(
        None, **config, data_dir=work_dir, database_url=f"sqlite:///{work_dir / 'agentgw.db'}"
    )
    app = create_app(settings)
    base = settings.base_url
    token, _ = mint_token(
        signing_keys(settings),
        base,
        subject=SUBJECT.removeprefix("user:"),
        audience=[f"{base}/mcp", f"{base}/mcp/{SERVER}"],
        client_id="bench",
        roles=["bench"],
    )
    async with app.router.lifespan_context(app):
        yield Bench(app, port, token, _fixture_answer(MSG_ID))


@contextlib.contextmanager
def _upstream() -> Iterator[str]:
    port = free_port()
    with start_process(upstream_args("fast", port), port) as process:
        yield process.url


def _line(name: str, config: str, measured: list[tuple[float, float]], base: list[float]) -> str:
    rounds = [cpu for cpu, _ in measured]
    us = [s * 1e6 for s in rounds]
    median, least, most = statistics.median(us), min(us), max(us)
    writer = statistics.median(w for _, w in measured) * 1e6
    out = f"{name:8} {config:12} {median:8.1f} us/call (least {least:6.1f}, most {most:7.1f};"
    out += f" writer {writer:5.1f})"
    if config != "all":
        delta = [(b - s) * 1e6 for b, s in zip(base, rounds, strict=True)]
        least = (min(base) - min(rounds)) * 1e6
        out += (
            f"  own: {statistics.median(delta):+7.1f} us (rounds {min(delta):+.1f} to {max(delta):+.1f}),"
            f" least to least {least:+7.1f} us"
        )
    return out


def report(found: Rounds) -> list[str]:
    """One line per target and configuration: CPU per call, and what switching it off saved."""
    lines = []
    for name, configs in found.items():
        base = [cpu for cpu, _ in configs["all"]]
        lines += [_line(name, config, rounds, base) for config, rounds in configs.items()]
    return lines


async def _main(args: argparse.Namespace) -> int:
    with _upstream() as upstream_url, tempfile.TemporaryDirectory(prefix="bench-stages-") as folder:
        async with running_bench(Path(folder), upstream_url) as bench:
            found = await measure(bench, args.calls, args.rounds, bridge=not args.no_bridge)
    print(f"CPU per tools/call in process, {args.rounds} rounds of {args.calls} calls, alternated")
    print("median over rounds (the least and the most round; the audit writer thread's part, median);")
    print("what the row switched off cost (`own`):")
    print("the median of `all` minus the row in each round (their range), and `all`'s least minus the row's")
    for line in report(found):
        print(line)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300, help="calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds, every configuration in each")
    parser.add_argument("--no-bridge", action="store_true", help="the pass-through path only")


def main(args: argparse.Namespace) -> int:
    install_uvloop()
    return asyncio.run(_main(args))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
