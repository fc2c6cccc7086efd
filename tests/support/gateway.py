"""Run `agentgw serve` as a subprocess on a free 127.0.0.1 port with a config the test writes.

with run_gateway(tmp_path, {"servers": [...], "policy": {"rules": [...]}}) as gw:
    gw.url            # http://127.0.0.1:P
    gw.mcp("demo")    # http://127.0.0.1:P/mcp/demo
    gw.output()       # what the gateway logged so far
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conformance.fixtures.launch import FixtureProcess, free_port, start_process

__all__ = ["RunningGateway", "data_dir_of", "gateway_args", "run_gateway", "write_config"]


@dataclass
class RunningGateway:
    process: FixtureProcess
    config_path: Path
    database_url: str

    @property
    def url(self) -> str:
        return self.process.url

    def mcp(self, server: str | None = None) -> str:
        return f"{self.url}/mcp/{server}" if server else f"{self.url}/mcp"

    def output(self) -> str:
        return self.process.output()

    @property
    def signing_keys(self) -> Path:
        """The built-in authorization server's key file (in the data directory `write_config` sets)."""
        return data_dir_of(self.config_path.parent) / "oauth-keys.json"


def data_dir_of(tmp_path: Path) -> Path:
    return tmp_path / "state"


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "gateway.yaml") -> Path:
    """Write `config` as YAML; the gateway's state (signing keys, say) goes in `data_dir_of(tmp_path)`
    unless it says otherwise."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"data_dir": str(data_dir_of(tmp_path)), **config}))
    return path


def gateway_args(config_path: Path, port: int, database_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agentgw",
        "serve",
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database-url",
        database_url,
    ]


@contextmanager
def run_gateway(
    tmp_path: Path, config: dict[str, Any], *, database_url: str | None = None
) -> Iterator[RunningGateway]:
    """Start the gateway with `config` (a dict written as YAML); stop it when the block exits."""
    config_path = write_config(tmp_path, config)
    database_url = database_url or f"sqlite:///{tmp_path / 'agentgw.db'}"
    port = free_port()
    with start_process(gateway_args(config_path, port, database_url), port) as process:
        yield RunningGateway(process, config_path, database_url)
