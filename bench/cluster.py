"""`python -m bench cluster`: direct, one node and three nodes behind nginx, on PostgreSQL and Redis.

Each gateway node runs the same config (shared database, Redis, signing keys); nginx spreads
connections round robin. The rows are the fast upstream direct, one node alone, and the three-node
cluster through nginx, all at the same concurrency, followed by what the shared stores did per
1000 calls (Redis commands, PostgreSQL transactions). tests/cluster/ uses the same launcher.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text

from bench.compare import upstream_args
from bench.load import http_client, install_uvloop, run, workload
from conformance.fixtures.launch import FixtureProcess, free_port, start_process
from tests.support.gateway import data_dir_of, gateway_args, write_config

__all__ = ["Cluster", "Node", "add_arguments", "main", "start_cluster"]

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
NGINX_CONF = """
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream gateway {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 60s;
            # A node that refuses connections (killed) is skipped; a request it already took is not
            # replayed elsewhere (it may have run), which is nginx's default for POST.
            proxy_next_upstream error;
            proxy_connect_timeout 1s;
            add_header X-Node $upstream_addr always;
        }}
    }}
}}
"""


@dataclass
class Node:
    name: str
    port: int
    home: Path
    config_path: Path
    process: FixtureProcess | None = None
    running: ExitStack = field(default_factory=ExitStack)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    url: str
    nodes: list[Node]
    database_url: str
    upstream: str
    redis_prefix: str
    args: dict[str, list[str]] = field(default_factory=dict)

    def mcp(self, server: str) -> str:
        return f"{self.url}/mcp/{server}"

    def kill(self, node: Node) -> None:
        """SIGKILL the node (no shutdown: whatever it held in memory is lost)."""
        assert node.process is not None
        node.process.process.kill()
        node.process.process.wait(10)

    def start(self, node: Node) -> None:
        node.process = node.running.enter_context(start_process(self.args[node.name], node.port))

    def stop(self, node: Node) -> None:
        node.running.close()
        node.process = None


def node_config(upstream: str, public_url: str, prefix: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What every node runs: shared stores, one upstream `up` open to anonymous callers (and the
    servers of `extra`, beside it)."""
    up = {"name": "up", "url": f"{upstream}/mcp", "timeout_s": 30}
    return {
        "allow_anonymous": True,
        "public_url": public_url,
        "redis_url": REDIS,
        "policy": {
            "database": True,
            "rules": [
                "p, anonymous, mcp:up/*, *, allow",
                "p, user:ops, admin:policies, *, allow",
                "p, user:ops, admin:audit, *, allow",
            ],
        },
        **extra,
        "servers": [up, *extra.get("servers", [])],
        "budgets": {"store": "redis", "redis_prefix": prefix, **extra.get("budgets", {})},
    }


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("nginx is not installed: scripts/system-packages installs it (Debian nginx-light)")
    return found


@contextmanager
def start_cluster(
    root: Path, upstream: str, *, nodes: int = 3, extra: dict[str, Any] | None = None, nginx_workers: int = 1
) -> Iterator[Cluster]:
    """`nodes` gateway nodes on a fresh PostgreSQL database and Redis prefix, behind nginx."""
    nginx = nginx_binary()
    database = f"agentgw_cluster_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    prefix = f"agentgw:cluster:{uuid.uuid4().hex[:8]}:"
    lb_port = free_port()
    public_url = f"http://127.0.0.1:{lb_port}"
    cluster = Cluster(public_url, [], database_url, upstream, prefix)
    lb: subprocess.Popen[bytes] | None = None
    try:
        config = node_config(upstream, public_url, prefix, extra or {})
        for i in range(nodes):
            home = root / f"node{i}"
            home.mkdir()
            node = Node(f"node{i}", _other_port(lb_port, cluster), home, write_config(home, config))
            cluster.args[node.name] = gateway_args(node.config_path, node.port, database_url)
            cluster.nodes.append(node)
            if i:
                # The first node made the signing keys; the others get the same ones.
                shutil.copytree(data_dir_of(cluster.nodes[0].home), data_dir_of(home), dirs_exist_ok=True)
            cluster.start(node)
        conf = root / "nginx"
        conf.mkdir()
        servers = "\n".join(f"        server 127.0.0.1:{n.port} max_fails=0;" for n in cluster.nodes)
        (conf / "nginx.conf").write_text(
            NGINX_CONF.format(dir=conf, servers=servers, port=lb_port, workers=nginx_workers)
        )
        lb = subprocess.Popen([nginx, "-c", str(conf / "nginx.conf"), "-p", str(conf)])
        _wait_serving(public_url, lb)
        yield cluster
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        for node in cluster.nodes:
            cluster.stop(node)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def _other_port(lb_port: int, cluster: Cluster) -> int:
    """A free port that is not nginx's nor another node's: nginx binds its port only after the nodes
    start, so a free port may be the one it was promised."""
    taken = {lb_port, *(node.port for node in cluster.nodes)}
    port = free_port()
    while port in taken:
        port = free_port()
    return port


def _wait_serving(url: str, lb: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if lb.poll() is not None:
            raise RuntimeError("nginx exited")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("nginx in front of the nodes did not answer /healthz")


# --- the benchmark ---------------------------------------------------------------------------------------


def _store_counters(database_url: str) -> tuple[int, int]:
    """(Redis commands processed so far, PostgreSQL transactions of the database so far)."""
    commands = int(redis.Redis.from_url(REDIS).info("stats")["total_commands_processed"])
    engine = create_engine(database_url)
    with engine.connect() as conn:
        xacts = conn.execute(
            text(
                "select xact_commit + xact_rollback from pg_stat_database where datname = current_database()"
            )
        ).scalar_one()
    engine.dispose()
    return commands, int(xacts)


async def _measure(url: str, calls: int, concurrency: int) -> Any:
    load = workload("mcp", url, tool="echo")
    async with http_client("aiohttp", concurrency) as http:
        await run(load, min(calls, 500), concurrency, http=http, stop_on_error=True)
        return await run(load, calls, concurrency, http=http)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)


def main(args: argparse.Namespace) -> int:
    install_uvloop()
    rows: list[tuple[str, Any, str]] = []
    with ExitStack() as stack:
        port = free_port()
        upstream = stack.enter_context(start_process(upstream_args("fast", port), port)).url
        root = Path(stack.enter_context(_tempdir()))
        rows.append(("direct", asyncio.run(_measure(f"{upstream}/mcp", args.calls, args.concurrency)), ""))
        for name, count in (("one node", 1), ("3 nodes + nginx", 3)):
            home = root / name.replace(" ", "-").replace("+", "")
            home.mkdir()
            with start_cluster(home, upstream, nodes=count) as cluster:
                before = _store_counters(cluster.database_url)
                result = asyncio.run(_measure(cluster.mcp("up"), args.calls, args.concurrency))
                after = _store_counters(cluster.database_url)
                per_k = 1000 / max(result.calls, 1)
                commands, xacts = ((a - b) * per_k for a, b in zip(after, before, strict=True))
                stores = f"redis {commands:.0f} cmds, pg {xacts:.0f} xacts per 1000 calls"
                rows.append((name, result, stores))
    print(f"{'path':<16} {'c':>3} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  stores")
    for name, result, stores in rows:
        print(
            f"{name:<16} {result.concurrency:>3} {result.calls_per_s:>8.0f} {result.p50_ms:>7.2f} "
            f"{result.p99_ms:>7.2f} {result.errors:>6}  {stores}"
        )
    return 0 if all(r.errors == 0 for _, r, _ in rows) else 1


@contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentgw-bench-cluster-") as path:
        yield path
