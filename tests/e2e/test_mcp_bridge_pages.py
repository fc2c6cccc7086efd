"""The merged catalog pages its lists with gateway-minted cursors, after policy has narrowed them."""

from __future__ import annotations

from collections.abc import Iterator

import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.support.gateway import RunningGateway, run_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, modern_upstream: str) -> Iterator[RunningGateway]:
    config = {
        "allow_anonymous": True,
        "list_page_size": 2,
        "servers": [{"name": "modern", "url": f"{modern_upstream}/mcp"}],
        # Five of the fixture's six tools: `whoami` is not granted.
        "policy": {
            "rules": ["p, anonymous, mcp:modern/*, *, allow", "p, anonymous, mcp:modern/whoami, *, deny"]
        },
    }
    with run_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_pages_cover_every_allowed_tool_exactly_once(gateway: RunningGateway, mode: str) -> None:
    async with Client(gateway.mcp(), mode=mode) as client:  # type: ignore[arg-type]
        names: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await client.session.list_tools(params=params)
            names += [t.name for t in page.tools]
            pages += 1
            assert len(page.tools) <= 2
            cursor = page.next_cursor
            if cursor is None:
                break
    assert sorted(names) == [
        "modern__add",
        "modern__ask_user",
        "modern__echo",
        "modern__progress",
        "modern__slow",
    ]
    assert pages == 3


@pytest.mark.parametrize(
    "cursor", ["garbage", "eyJvIjotMX0=", "eyJ4IjoxfQ=="]
)  # not base64 JSON; {"o":-1}; {"x":1}
async def test_a_forged_cursor_is_refused_as_invalid_params(gateway: RunningGateway, cursor: str) -> None:
    async with Client(gateway.mcp(), mode="2026-07-28") as client:
        with pytest.raises(MCPError, match="invalid cursor"):
            await client.session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
