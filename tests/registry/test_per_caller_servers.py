"""Servers whose upstream credential is per caller (token exchange, ID-JAG) are pass-through only: the
registry refuses every way of putting one behind a virtual server (bridged over shared sessions), and a
stored spec names its secrets without holding them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentgw.registry.models import McpServerSpec, VirtualServerSpec
from agentgw.registry.store import RegistryConflict, RegistryStore
from agentgw.storage import create_db, make_engine

EXCHANGE = {"mode": "token_exchange", "client": {"client_id": "gw", "secret": "gw-secret"}}


def store(tmp_path: Path) -> RegistryStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_db(engine)
    return RegistryStore(engine)


def server(name: str, credential: dict[str, Any] | None = None) -> McpServerSpec:
    return McpServerSpec.model_validate(
        {"name": name, "url": f"http://127.0.0.1:9/{name}", "credential": credential or {"mode": "none"}}
    )


def test_a_config_whose_virtual_server_selects_a_per_caller_server_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryConflict, match=r"selects \['pay'\], whose credential is per caller"):
        store(tmp_path).sync_config(
            [server("pay", EXCHANGE), server("docs")],
            [VirtualServerSpec(name="mix", tools=["pay/*", "docs/*"])],
        )


def test_the_admin_api_cannot_select_one_nor_switch_a_selected_server_to_one(tmp_path: Path) -> None:
    registry = store(tmp_path)
    registry.put_server(server("pay", EXCHANGE))
    registry.put_server(server("docs"))
    with pytest.raises(RegistryConflict, match="per caller"):
        registry.put_virtual(VirtualServerSpec(name="mix", tools=["pay/refund"]))
    registry.put_virtual(VirtualServerSpec(name="reading", tools=["docs/*"]))
    with pytest.raises(RegistryConflict, match="per caller"):
        registry.put_server(
            server(
                "docs",
                {
                    **EXCHANGE,
                    "mode": "id_jag",
                    "idp_token_url": "http://i/t",
                    "idp_client": EXCHANGE["client"],
                    "authorization_server": "http://a",
                    "token_url": "http://a/t",
                },
            ),
            replace=True,
        )
    registry.put_server(
        server("docs", {"mode": "static", "secret": "docs-key"}), replace=True
    )  # own identity: fine
    assert registry.server("docs") is not None and registry.server("docs").credential.mode == "static"  # type: ignore[union-attr]


def test_a_stored_spec_round_trips_and_holds_only_the_names_of_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_SECRET", "the-actual-secret")
    registry = store(tmp_path)
    spec = server("pay", {**EXCHANGE, "tool_scopes": {"refund": ["pay.write"]}, "scopes": ["pay.read"]})
    registry.put_server(spec)
    registry.refresh(force=True)
    assert registry.server("pay") == spec
    assert (
        '"secret":"gw-secret"' in spec.model_dump_json() and "the-actual-secret" not in spec.model_dump_json()
    )
