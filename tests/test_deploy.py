"""The deployment examples in deploy/ stay true to the gateway: they parse, the config they mount
loads, and the Kubernetes ConfigMap carries the same config and policy as the compose files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentgw.settings import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENV = {
    "AGENTGW_PUBLIC_URL": "https://gateway.example.com",
    "AGENTGW_DATABASE_URL": "postgresql+psycopg://agentgw:pw@postgres:5432/agentgw",
    "AGENTGW_REDIS_URL": "redis://redis:6379/0",
}


def _k8s() -> dict[str, dict[str, object]]:
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "agentgw.yaml").read_text()))
    return {doc["kind"]: doc for doc in documents}


def test_the_cluster_config_loads_with_shared_stores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = yaml.safe_load((DEPLOY / "gateway.yaml").read_text())
    config["policy"]["file"] = str(DEPLOY / "policy.csv")
    config["data_dir"] = str(tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    assert settings.database_url == ENV["AGENTGW_DATABASE_URL"]
    assert settings.redis_url == ENV["AGENTGW_REDIS_URL"]
    assert settings.budgets.store == "redis"
    assert settings.policy.database is True


def test_the_configmap_carries_the_same_config_and_policy() -> None:
    data = _k8s()["ConfigMap"]["data"]
    assert isinstance(data, dict)
    assert yaml.safe_load(data["gateway.yaml"]) == yaml.safe_load((DEPLOY / "gateway.yaml").read_text())
    rules = [
        line for line in (DEPLOY / "policy.csv").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert data["policy.csv"].splitlines() == rules


def test_replicas_are_probed_on_readiness_and_share_nothing_on_disk() -> None:
    deployment = _k8s()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Each replica names its pod address, so the others can forward bridged sessions' requests to it.
    env = {item["name"]: item for item in container["env"]}
    assert env["AGENTGW_NODE_URL"]["value"] == "http://$(POD_IP):8080"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    nodes = [name for name in compose["services"] if name.startswith("gateway-")]
    upstreams = [
        line.split()[1]
        for line in (DEPLOY / "nginx.conf").read_text().splitlines()
        if "server gateway-" in line
    ]
    assert sorted(f"{name}:8080" for name in nodes) == sorted(upstreams)
