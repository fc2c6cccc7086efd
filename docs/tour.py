"""The README's 60-second tour: two users, a denied call, a budget stop. Run it against `agentgw serve`.

    ALICE=$(.venv/bin/agentgw token issue --subject alice) \
    BOB=$(.venv/bin/agentgw token issue --subject bob) .venv/bin/python docs/tour.py
"""

import asyncio
import os

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ.get("AGENTGW_URL", "http://127.0.0.1:8080") + "/mcp"


def as_user(token: str, run: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} | ({"Agent-Run-Id": run} if run else {})
    return Client(streamable_http_client(URL, http_client=httpx2.AsyncClient(headers=headers)))


async def main() -> None:
    for user in ("alice", "bob"):
        async with as_user(os.environ[user.upper()]) as client:
            print(user, "sees", [tool.name for tool in (await client.list_tools()).tools])
    async with as_user(os.environ["ALICE"]) as client:
        try:
            await client.call_tool("demo__delete_repo", {"name": "prod"})
        except Exception as exc:
            print("delete_repo:", exc)
    async with as_user(os.environ["ALICE"], run="run-42") as client:
        for call in range(1, 12):
            try:
                await client.call_tool("demo__get_weather", {"city": "Oslo"})
            except Exception as exc:
                print(f"call {call}:", exc)
                break


asyncio.run(main())
