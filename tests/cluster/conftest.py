"""Three gateway nodes behind nginx (round robin, no stickiness) on PostgreSQL and Redis, started by
`bench.cluster.start_cluster` (the launcher `python -m bench cluster` measures with)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentgw.oauth.keys import SigningKeys
from agentgw.oauth.server import mint_token
from bench.cluster import Cluster, start_cluster
from conformance.fixtures.launch import start_upstream_sync
from tests.support.gateway import data_dir_of


@pytest.fixture(scope="module")
def cluster_extra() -> dict[str, Any]:
    """Extra config for a module's nodes (budget rules, say); override in the module."""
    return {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_extra: dict[str, Any]) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    with (
        start_upstream_sync("modern") as upstream,
        start_cluster(root, upstream, extra=cluster_extra) as made,
    ):
        yield made


def bearer(cluster: Cluster, subject: str, endpoint: str) -> dict[str, str]:
    """A token of the nodes' shared signing key, issued for the public URL, audience `endpoint`."""
    keys = SigningKeys(data_dir_of(cluster.nodes[0].home) / "oauth-keys.json")
    value, _ = mint_token(
        keys, cluster.url, subject=subject, audience=f"{cluster.url}{endpoint}", client_id="tests"
    )
    return {"authorization": f"Bearer {value}"}
