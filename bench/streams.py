"""Long streams and large answers through the pass-through, against a checkout's gateway.

    python -m bench.streams starve [--streams 600] [--hold 20] [--short-concurrency 10] [--checkout DIR]
    python -m bench.streams memory [--answers 3] [--mb 100] [--checkout DIR]

`starve`: opens `--streams` concurrent `tools/call`s whose SSE answers last `--hold` seconds (a
progress event each second, then the result), and while they are open sends short calls (JSON
answers) from `--short-concurrency` workers; reports the short calls' p50/p99 and errors, and how many
streams ended with their result. `memory`: `--answers` concurrent calls each answered with `--mb` MB
of JSON; reports the gateway's RSS before, its peak (VmHWM) and after, and what the callers got.

The upstream runs in its own process (`python -m bench.streams upstream --port P`); the gateway is
`agentgw serve` from `--checkout` (default: this one), so two checkouts compare on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import percentile

ROOT = Path(__file__).resolve().parents[1]
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
}


# --- the upstream --------------------------------------------------------------------------------


def upstream_app(hold_s: float, answer_mb: int) -> Any:
    huge_text = "x" * (answer_mb * 1024 * 1024)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body or b"{}")
        name = request.get("params", {}).get("name")
        rpc_id = request.get("id")
        if name == "long":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for n in range(int(hold_s)):
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": n},
                }
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + json.dumps(note).encode() + b"\n\n",
                        "more_body": True,
                    }
                )
                await asyncio.sleep(1)
            done = {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [{"type": "text", "text": "done"}]}}
            await send(
                {"type": "http.response.body", "body": b"data: " + json.dumps(done).encode() + b"\n\n"}
            )
            return
        text = huge_text if name == "huge" else "ok"
        answer = json.dumps(
            {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [{"type": "text", "text": text}]}}
        )
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.encode()})

    return app


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)  # another process starting: nothing to wait on but its port
                continue
            writer.close()
            return


@contextlib.asynccontextmanager
async def processes(checkout: Path, hold_s: float, answer_mb: int) -> AsyncIterator[tuple[str, int]]:
    """(the gateway's /mcp/bench URL, the gateway's pid)."""
    up_port, gw_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    upstream = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "bench.streams",
            "upstream",
            "--port",
            str(up_port),
            "--hold",
            str(hold_s),
            "--mb",
            str(answer_mb),
        ],
        cwd=ROOT,
    )
    config = {
        # The gateway's keys and checkpoint sink in the scratch directory, not the checkout's `.agentgw`
        # (where `agentgw audit verify` run from the checkout would take them for its own).
        "data_dir": str(work / "state"),
        "allow_anonymous": True,
        "servers": [{"name": "bench", "url": f"http://127.0.0.1:{up_port}/mcp", "timeout_s": 60}],
        "policy": {"rules": ["p, anonymous, mcp:*, *, allow"]},
    }
    (work / "gw.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    log = (work / "gw.log").open("wb")
    gateway = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "agentgw",
            "serve",
            "--config",
            str(work / "gw.json"),
            "--port",
            str(gw_port),
            "--database-url",
            f"sqlite:///{work / 'gw.db'}",
        ],
        cwd=checkout,
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_port(up_port)
        await wait_port(gw_port)
        yield f"http://127.0.0.1:{gw_port}/mcp/bench", gateway.pid
    finally:
        for process in (gateway, upstream):
            process.terminate()
            await asyncio.wait_for(process.wait(), 10)
        log.close()
        print(f"gateway log: {work / 'gw.log'}", file=sys.stderr)


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def call_body(tool: str, rpc_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {}, "_meta": META},
    }


def headers(tool: str) -> dict[str, str]:
    return {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": tool,
    }


async def one(session: aiohttp.ClientSession, url: str, tool: str, rpc_id: int) -> tuple[int, bytes]:
    async with session.post(url, json=call_body(tool, rpc_id), headers=headers(tool)) as response:
        return response.status, await response.read()


def answered(status: int, body: bytes, rpc_id: int) -> bool:
    if status != 200:
        return False
    for line in reversed(body.splitlines()):
        text = line[5:] if line.startswith(b"data:") else line
        try:
            message = json.loads(text)
        except ValueError:
            continue
        return isinstance(message, dict) and message.get("id") == rpc_id and "result" in message
    return False


# --- scenarios -----------------------------------------------------------------------------------


async def starve(args: argparse.Namespace) -> dict[str, Any]:
    async with processes(args.checkout, args.hold, 1) as (url, _):
        timeout = aiohttp.ClientTimeout(total=None, sock_read=args.hold * 3)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            streams = [
                asyncio.create_task(one(session, url, "long", 100_000 + n)) for n in range(args.streams)
            ]
            await asyncio.sleep(2)  # let the streams open
            latencies: list[float] = []
            errors = 0
            stop = time.monotonic() + args.hold - 4

            async def worker(w: int) -> None:
                nonlocal errors
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    rpc_id = w * 1_000_000 + n
                    started = time.perf_counter()
                    try:
                        status, body = await asyncio.wait_for(
                            one(session, url, "short", rpc_id), args.hold * 2
                        )
                    except (TimeoutError, aiohttp.ClientError):
                        status, body = 0, b""
                    latencies.append(time.perf_counter() - started)
                    if not answered(status, body, rpc_id):
                        errors += 1

            await asyncio.gather(*(worker(w) for w in range(args.short_concurrency)))
            results = await asyncio.gather(*streams, return_exceptions=True)
    done = sum(
        1 for n, r in enumerate(results) if not isinstance(r, BaseException) and answered(*r, 100_000 + n)
    )
    busy = sum(1 for r in results if not isinstance(r, BaseException) and r[0] == 503)
    return {
        "streams": args.streams,
        "streams_answered": done,
        "streams_refused_busy": busy,
        "short_calls": len(latencies),
        "short_errors": errors,
        "short_p50_ms": round(percentile(sorted(latencies), 0.50) * 1000, 1),
        "short_p99_ms": round(percentile(sorted(latencies), 0.99) * 1000, 1),
    }


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    async with processes(args.checkout, 1, args.mb) as (url, pid):
        before = rss_kib(pid)["VmRSS"]
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(one(session, url, "huge", n) for n in range(args.answers)))
        after = rss_kib(pid)
    return {
        "answers": args.answers,
        "answer_mb": args.mb,
        "rss_before_mb": round(before / 1024),
        "rss_peak_mb": round(after["VmHWM"] / 1024),
        "rss_after_mb": round(after["VmRSS"] / 1024),
        "callers_got": sorted({f"{status} {len(body)} bytes" for status, body in results}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--hold", type=float, default=20)
    up.add_argument("--mb", type=int, default=100)
    for name in ("starve", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--checkout", type=Path, default=ROOT)
    sub.choices["starve"].add_argument("--streams", type=int, default=600)
    sub.choices["starve"].add_argument("--hold", type=float, default=20)
    sub.choices["starve"].add_argument("--short-concurrency", type=int, default=10)
    sub.choices["memory"].add_argument("--answers", type=int, default=3)
    sub.choices["memory"].add_argument("--mb", type=int, default=100)
    args = parser.parse_args(argv)
    if args.command == "upstream":
        import uvicorn

        uvicorn.run(
            upstream_app(args.hold, args.mb),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            backlog=4096,
        )
        return 0
    result = asyncio.run(starve(args) if args.command == "starve" else memory(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
