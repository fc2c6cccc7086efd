"""The registry store: config-owned and API-owned rows, name conflicts, and change pick-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentgw.registry.models import McpServerSpec, VirtualServerSpec
from agentgw.registry.store import RegistryConflict, RegistryStore
from agentgw.storage import create_db, make_engine


def store(tmp_path: Path) -> RegistryStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_db(engine)
    return RegistryStore(engine)


def server(name: str) -> McpServerSpec:
    return McpServerSpec(name=name, url=f"http://127.0.0.1:9/{name}")


def test_config_rows_are_the_files_truth_and_api_rows_survive_a_resync(tmp_path: Path) -> None:
    registry = store(tmp_path)
    registry.sync_config([server("a"), server("b")], [])
    registry.put_server(server("api-owned"))
    registry.sync_config([server("a")], [])  # b left the file
    assert sorted(s.name for s in registry.servers()) == ["a", "api-owned"]
    with pytest.raises(RegistryConflict, match="declared in the config file"):
        registry.remove_server("a")
    with pytest.raises(RegistryConflict, match="declared in the config file"):
        registry.put_server(server("a"), replace=True)


def test_servers_and_virtual_servers_share_one_namespace(tmp_path: Path) -> None:
    registry = store(tmp_path)
    registry.sync_config([server("github")], [])
    with pytest.raises(RegistryConflict, match="is a server"):
        registry.put_virtual(VirtualServerSpec(name="github", tools=["github/*"]))
    registry.put_virtual(VirtualServerSpec(name="triage", tools=["github/*"]))
    with pytest.raises(RegistryConflict, match="is a virtual server"):
        registry.put_server(server("triage"))
    with pytest.raises(RegistryConflict, match="selects unknown servers: nope"):
        registry.put_virtual(VirtualServerSpec(name="other", tools=["nope/x"]))
    assert registry.remove_virtual("triage") is True
    assert registry.remove_virtual("triage") is False


@pytest.mark.parametrize(
    ("servers", "virtual", "message"),
    [
        ([server("a"), server("a")], [], "declared more than once"),
        ([server("a")], [VirtualServerSpec(name="a", tools=["a/*"])], "declared more than once"),
        ([server("a")], [VirtualServerSpec(name="v", tools=["b/*"])], "undeclared servers"),
    ],
)
def test_a_config_with_conflicting_names_is_refused_whole(
    tmp_path: Path, servers: list[McpServerSpec], virtual: list[VirtualServerSpec], message: str
) -> None:
    registry = store(tmp_path)
    with pytest.raises(RegistryConflict, match=message):
        registry.sync_config(servers, virtual)
    registry.refresh(force=True)
    assert registry.servers() == []


def test_a_write_by_another_process_is_picked_up_by_refresh(tmp_path: Path) -> None:
    first, second = store(tmp_path), store(tmp_path)
    first.refresh(force=True)
    seen: list[int] = []
    first.on_change(lambda: seen.append(1))
    second.put_server(server("late"))
    assert first.server("late") is None
    assert first.refresh() is True
    assert first.server("late") is not None and seen == [1]
    assert first.refresh() is False  # nothing new: no reload


def test_a_disabled_server_is_not_served(tmp_path: Path) -> None:
    registry = store(tmp_path)
    registry.put_server(McpServerSpec(name="off", url="http://127.0.0.1:9/x", enabled=False))
    assert registry.server("off") is None
    assert [s.name for s in registry.all_servers()] == ["off"]
