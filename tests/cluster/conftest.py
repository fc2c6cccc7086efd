"""Three gateway nodes behind nginx (round robin, no stickiness) on PostgreSQL and Redis.

The nodes share what a deployment shares: one config (but for the data directory), one database,
one Redis, and the signing keys of the built-in authorization server (a Secret, in Kubernetes).
nginx adds an `X-Node` header naming the node that answered, so a test can see the spread.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from conformance.fixtures.launch import FixtureProcess, free_port, start_process, start_upstream_sync
from tests.support.gateway import data_dir_of, gateway_args, write_config

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
NODES = 3
NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream gateway {{
{servers}
        keepalive 32;
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
    _args: dict[str, list[str]] = field(default_factory=dict)

    def mcp(self, server: str) -> str:
        return f"{self.url}/mcp/{server}"

    def bearer(self, subject: str, endpoint: str) -> dict[str, str]:
        """A token of the nodes' shared signing key, issued for the public URL, audience `endpoint`."""
        keys = SigningKeys(data_dir_of(self.nodes[0].home) / "oauth-keys.json")
        value, _ = mint_token(
            keys, self.url, subject=subject, audience=f"{self.url}{endpoint}", client_id="tests"
        )
        return {"authorization": f"Bearer {value}"}

    def kill(self, node: Node) -> None:
        """SIGKILL the node (no shutdown: whatever it held in memory is lost)."""
        assert node.process is not None
        node.process.process.kill()
        node.process.process.wait(10)

    def start(self, node: Node) -> None:
        node.process = node.running.enter_context(start_process(self._args[node.name], node.port))

    def stop(self, node: Node) -> None:
        node.running.close()
        node.process = None


def node_config(upstream: str, public_url: str, prefix: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "allow_anonymous": True,
        "public_url": public_url,
        "redis_url": REDIS,
        "servers": [{"name": "up", "url": f"{upstream}/mcp", "timeout_s": 30}],
        "policy": {
            "database": True,
            "rules": [
                "p, anonymous, mcp:up/*, *, allow",
                "p, user:ops, admin:policies, *, allow",
                "p, user:ops, admin:audit, *, allow",
            ],
        },
        **extra,
        "budgets": {"store": "redis", "redis_prefix": prefix, **extra.get("budgets", {})},
    }


@pytest.fixture(scope="module")
def cluster_extra() -> dict[str, Any]:
    """Extra config for a module's nodes (budget rules, say); override in the module."""
    return {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_extra: dict[str, Any]) -> Iterator[Cluster]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: scripts/system-packages installs it (Debian nginx-light)")
    root = tmp_path_factory.mktemp("cluster")
    database = f"agentgw_cluster_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    prefix = f"agentgw:cluster:{uuid.uuid4().hex[:8]}:"
    lb_port = free_port()
    public_url = f"http://127.0.0.1:{lb_port}"
    nodes: list[Node] = []
    lb: subprocess.Popen[bytes] | None = None
    try:
        with start_upstream_sync("modern") as upstream:
            config = node_config(upstream, public_url, prefix, cluster_extra)
            made = Cluster(public_url, nodes, database_url, upstream, prefix)
            for i in range(NODES):
                home = root / f"node{i}"
                home.mkdir()
                node = Node(f"node{i}", free_port(), home, write_config(home, config))
                made._args[node.name] = gateway_args(node.config_path, node.port, database_url)
                nodes.append(node)
                if i:
                    # The first node made the signing keys; the others get the same ones.
                    keys = data_dir_of(nodes[0].home)
                    shutil.copytree(keys, data_dir_of(home), dirs_exist_ok=True)
                made.start(node)
            conf = root / "nginx"
            conf.mkdir()
            servers = "\n".join(f"        server 127.0.0.1:{n.port} max_fails=0;" for n in nodes)
            (conf / "nginx.conf").write_text(NGINX_CONF.format(dir=conf, servers=servers, port=lb_port))
            lb = subprocess.Popen([nginx, "-c", str(conf / "nginx.conf"), "-p", str(conf)])
            _wait_serving(public_url, lb)
            yield made
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        for node in nodes:
            made.stop(node)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def _wait_serving(url: str, lb: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert lb.poll() is None, "nginx exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("nginx in front of the nodes did not answer /healthz")
