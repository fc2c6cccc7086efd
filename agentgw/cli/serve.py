"""`agentgw serve`: run the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from agentgw import __version__
from agentgw.cli.settings import add_common_options, settings_from_args
from agentgw.identity import record_base_url

if TYPE_CHECKING:
    import socket
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from fastapi import FastAPI

    from agentgw.settings import Settings

__all__ = ["register", "worker_app", "worker_node_urls"]

# Worker processes are spawned, not forked: they read the parent's settings from here.
WORKER_SETTINGS_ENV = "_AGENTGW_WORKER_SETTINGS"
# A worker's own node URL (its port of its own), which its bridged sessions' bindings name.
WORKER_NODE_URL_ENV = "_AGENTGW_WORKER_NODE_URL"


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway")
    add_common_options(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    # Chosen by measurement (bench/RESULTS.md): uvloop + httptools cost the least CPU per call here.
    serve.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop")
    serve.add_argument("--http", choices=("httptools", "h11"), default="httptools", help="HTTP/1.1 parser")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each listening on the port with SO_REUSEPORT (Linux; more than 1 needs "
        "redis_url for shared MCP sessions and budgets.store sql or redis)",
    )
    serve.set_defaults(func=_serve)


def _configure_logging(settings: Settings) -> None:
    from agentgw.log_format import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    # Decisions go to the audit log; casbin's and httpx's per-request lines would only repeat them.
    logging.getLogger("casbin").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    # authlib logs every token it issues at DEBUG ("Issue token {...}"): never below INFO.
    logging.getLogger("authlib").setLevel(max(logging.INFO, logging.getLogger().level))


def worker_app() -> FastAPI:
    """The app of one worker process (`--workers` > 1), built from the parent's settings.

    Raises:
        RuntimeError: not started by `agentgw serve --workers`.
    """
    from agentgw.app import create_app
    from agentgw.settings import Settings

    encoded = os.environ.get(WORKER_SETTINGS_ENV)
    if encoded is None:
        raise RuntimeError(
            f"{WORKER_SETTINGS_ENV} is not set: start workers with `agentgw serve --workers N`"
        )
    from agentgw.cli import client_timeouts

    settings = Settings.model_validate_json(encoded)
    if own := os.environ.get(WORKER_NODE_URL_ENV):
        settings = settings.model_copy(update={"node_url": own})
    _configure_logging(settings)
    client_timeouts.configure(settings.client_idle_timeout_s, settings.client_read_timeout_s)
    return create_app(settings)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agentgw.app import create_app
    from agentgw.cli import client_timeouts

    settings = settings_from_args(args)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    # Pass-through sessions live in the process that bound them unless they are in Redis: with
    # several workers a legacy client's next request may reach another worker and lose its session.
    if args.workers > 1 and not getattr(settings, "redis_url", None):
        print("error: --workers > 1 needs redis_url (MCP sessions shared between workers)", file=sys.stderr)
        return 2
    # Each worker counts its own calls; a separate metrics port could be bound by one of them only.
    if args.workers > 1 and settings.metrics.enabled and settings.metrics.port is not None:
        print(
            "error: --workers > 1 cannot serve metrics.port: each worker counts its own calls and only "
            "one could bind the port; run one process per port (or leave metrics.port unset)",
            file=sys.stderr,
        )
        return 2
    # A local budget ledger is one process's memory: each worker would count on its own.
    if args.workers > 1 and settings.budgets.store == "local":
        print(
            "error: --workers > 1 needs budgets.store sql or redis: the local budget store counts in one "
            "process only (redis: fastest across workers; sql: every reservation committed to the database)",
            file=sys.stderr,
        )
        return 2
    _configure_logging(settings)
    client_timeouts.configure(settings.client_idle_timeout_s, settings.client_read_timeout_s)
    base = settings.base_url
    if args.workers > 1:
        return _serve_workers(args, settings)
    app = create_app(settings)
    print(f"agentgw {__version__} listening on {base}", flush=True)
    for spec in app.state.gateway.registry.servers():
        print(f"  MCP server {spec.name!r}: {base}/mcp/{spec.name}", flush=True)
    for agent in settings.a2a_agents:
        if agent.enabled:
            print(f"  A2A agent {agent.name!r}: {base}/a2a/{agent.name}", flush=True)
    for route in settings.llm_routes:
        print(f"  LLM model {route.name!r}: {base}/v1 (model {route.name!r})", flush=True)
    if settings.demo:
        print(
            "  demo mode: SQLite, the built-in demo upstream and demo policy; anonymous callers allowed",
            flush=True,
        )
        if settings.auth.builtin.enabled:
            from agentgw.cli.settings import DEMO_USERS

            logins = ", ".join(f"{name} / {password}" for name, (password, _) in DEMO_USERS.items())
            print(f"  demo users for {base}/oauth/authorize: {logins}", flush=True)
    record_base_url(settings)
    uvicorn.run(app, **_uvicorn_options(args, settings))
    return 0


def _uvicorn_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from agentgw.cli import client_timeouts

    return {
        "host": settings.host,
        "port": settings.port,
        "loop": args.loop,
        # uvicorn's parser, with a deadline for each request's headers and body (slow clients).
        "http": client_timeouts.PROTOCOLS[args.http],
        "timeout_keep_alive": settings.client_idle_timeout_s,
        "log_level": "warning",
        # uvicorn's own lines go through the gateway's handler (`log_format`), not a format of its own.
        "log_config": None,
        # Every call is in the audit log; an access log line per request would only repeat it.
        "access_log": False,
        # Nothing reads the peer address or scheme (URLs come from `base_url`), so X-Forwarded-*
        # from a client on 127.0.0.1 is not trusted by default (uvicorn's default would), and the
        # middleware that applies it costs every request.
        "proxy_headers": False,
        # No `server: uvicorn` on every answer: it names the software to whoever asks, for nothing.
        "server_header": False,
        "lifespan": "on",
    }


def worker_node_urls(settings: Settings, workers: int) -> list[tuple[int, str]]:
    """Each worker's own port and node URL: the node's URL with port `port + 1 + slot`; none when the
    node has no URL (it forwards nothing).

    The shared port reaches whichever worker the kernel picks; a forwarded request for a bridged
    session must reach the one process that holds it, so each worker is also reachable on its own.
    """
    from urllib.parse import urlsplit

    node = settings.own_node_url()
    if node is None:
        return []
    parts = urlsplit(node)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    ports = [settings.port + 1 + slot for slot in range(workers)]
    return [(port, parts._replace(netloc=f"{host}:{port}").geturl()) for port in ports]


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """Run `args.workers` worker processes, each listening on its own SO_REUSEPORT socket.

    One shared listening socket lets whichever worker wakes first accept a whole burst; a socket per
    worker lets the kernel spread new connections over them. Each worker also listens on a port of
    its own (`worker_node_urls`), where forwarded requests for its bridged sessions reach it. The
    parent only supervises: it restarts a worker that dies once serving, and stops them all on
    SIGTERM or SIGINT, or when one cannot start.
    """
    import multiprocessing
    import signal
    import socket
    from multiprocessing.connection import wait

    if not hasattr(socket, "SO_REUSEPORT"):
        print("error: --workers > 1 needs SO_REUSEPORT (Linux)", file=sys.stderr)
        return 2
    # Refuse a port something already listens on: with SO_REUSEPORT another gateway of this user
    # would otherwise silently share the port (and its traffic) with ours.
    own = worker_node_urls(settings, args.workers)
    for port in [settings.port, *(port for port, _ in own)]:
        try:
            if port > 65535:
                raise OSError(f"port {port} is out of range (a worker's own port is port + 1 + its slot)")
            _bound_socket(settings.host, port, reuse_port=False).close()
        except OSError as exc:
            print(f"error: cannot listen on {settings.host}:{port}: {exc}", file=sys.stderr)
            return 1
    os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()
    record_base_url(settings)
    options = _uvicorn_options(args, settings)
    spawn = multiprocessing.get_context("spawn")
    workers: dict[int, tuple[BaseProcess, Connection]] = {}

    def start(slot: int) -> None:
        ready, ready_in_child = spawn.Pipe(duplex=False)
        process = spawn.Process(
            target=_run_worker,
            args=(options, ready_in_child, own[slot] if own else None),
            name=f"agentgw-worker-{slot}",
        )
        process.start()
        ready_in_child.close()
        workers[slot] = (process, ready)

    # Signals wake the wait below through this socket; the handler itself only records them.
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    previous_wakeup = signal.set_wakeup_fd(wake_write.fileno())
    # SIGHUP too: its default would end the parent alone and leave the workers serving, unsupervised.
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stop_signals}
    try:
        # The first worker creates what the stores need (schema, first rows) alone: workers
        # starting together on a fresh database would race to create the same rows.
        start(0)
        unready = {0}
        announced = False
        while True:
            waiting: list[Connection | socket.socket | int] = [wake_read]
            waiting += [process.sentinel for process, _ in workers.values()]
            waiting += [workers[slot][1] for slot in unready]
            if wake_read in wait(waiting):
                return 0
            for slot, (process, ready) in list(workers.items()):
                if slot in unready and ready.poll():
                    try:
                        ready.recv()
                    except EOFError:  # it exited before it was ready
                        process.join()
                    else:
                        unready.discard(slot)
                if process.is_alive():
                    continue
                ready.close()
                if slot in unready:
                    # Its app, settings or socket is broken: every restart would fail the same way.
                    print(
                        f"error: worker {process.pid} could not start (exit {process.exitcode})",
                        file=sys.stderr,
                    )
                    return 1
                logging.getLogger(__name__).warning(
                    "worker %s exited (code %s); starting another", process.pid, process.exitcode
                )
                start(slot)
                unready.add(slot)
            if not unready and len(workers) < args.workers:
                for slot in range(len(workers), args.workers):
                    start(slot)
                    unready.add(slot)
            elif not unready and not announced:
                announced = True
                print(
                    f"agentgw {__version__} listening on {settings.base_url} with {args.workers} workers",
                    flush=True,
                )
    finally:
        _stop_workers([process for process, _ in workers.values()])
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_read.close()
        wake_write.close()


# Workers finish their requests and close their stores on SIGTERM; one that takes longer is killed.
_WORKER_STOP_GRACE_S = 0.8


def _stop_workers(processes: list[BaseProcess]) -> None:
    import time

    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _WORKER_STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _run_worker(options: dict[str, Any], ready: Connection, own: tuple[int, str] | None) -> None:
    """One worker process: uvicorn serving `worker_app` on a listening socket of its own on the shared
    port, and on `own`'s port (its node URL) when the node forwards bridged sessions' requests."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    class _Worker(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            ready.send(True)

    config = uvicorn.Config("agentgw.cli.serve:worker_app", factory=True, **options)
    if own is not None:
        os.environ[WORKER_NODE_URL_ENV] = own[1]
    sockets = []
    # Bound here, listening once the app has started (uvicorn's `listen`): until then the kernel
    # gives new connections to the other workers. Only this worker listens on its own port.
    for port, shared in [(config.port, True), *([(own[0], False)] if own else [])]:
        try:
            sockets.append(_bound_socket(config.host, port, reuse_port=shared))
        except OSError as exc:
            print(f"error: worker cannot listen on {config.host}:{port}: {exc}", file=sys.stderr)
            sys.exit(STARTUP_FAILURE)
    _Worker(config).run(sockets=sockets)


def _bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to `host`:`port`, not yet listening.

    With `reuse_port`, the kernel spreads new connections over all such sockets on one address.
    """
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
