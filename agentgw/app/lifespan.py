"""What runs while the gateway serves: the session managers, the registry poller, the policy watch,
the metrics port; and the order in which it all stops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer

from agentgw.app.gateway import Gateway
from agentgw.metrics import serve_metrics
from agentgw.registry.folder import watch as watch_folder
from agentgw.registry.models import McpServerSpec
from agentgw.registry.pins import Pins
from agentgw.registry.store import RegistryStore

__all__ = ["REGISTRY_POLL_S", "lifespan"]

log = logging.getLogger(__name__)

# As for the policy (filters/authorize.py DB_POLL_S): one version row read per look.
REGISTRY_POLL_S = 0.5


def lifespan(gateway: Gateway, demo: MCPServer | None) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """The app's lifespan: start what `gateway` runs in the background, stop it all on the way out."""
    settings = gateway.settings

    @contextlib.asynccontextmanager
    async def run(_: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if demo is not None:
                await stack.enter_async_context(demo.session_manager.run())
            await stack.enter_async_context(gateway.bridge.session_manager.run())
            loop = asyncio.get_running_loop()

            # Registry changes may come from the poller's thread: resync on the event loop.
            def resync() -> None:
                loop.call_soon_threadsafe(gateway.sessions.sync, gateway.registry.servers())

            gateway.registry.on_change(resync)
            gateway.sessions.sync(gateway.registry.servers())
            poller = asyncio.create_task(_poll_registry(gateway.registry, gateway.pins))
            policy_watch = asyncio.create_task(gateway.authorizer.watch())
            watches = [poller, policy_watch]
            if gateway.folder is not None:

                def apply(servers: list[McpServerSpec]) -> None:
                    gateway.registry.sync_config([*settings.servers, *servers], settings.virtual_servers)

                watches.append(asyncio.create_task(watch_folder(gateway.folder, apply, REGISTRY_POLL_S)))
            if gateway.metrics is not None and settings.metrics.port is not None:
                await stack.enter_async_context(
                    serve_metrics(gateway.metrics, settings.metrics.host, settings.metrics.port)
                )
            # What start-up built (libraries, settings, stages) lives as long as the process: keep it
            # out of the cyclic GC, whose full passes over that many objects stall every call in flight.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
                for task in watches:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await gateway.identity.aclose()
                if gateway.credentials is not None:
                    await gateway.credentials.aclose()
                await gateway.sessions.aclose()
                await gateway.mcp_upstream.aclose()
                if gateway.nodes is not None:
                    await gateway.nodes.aclose()
                await gateway.llm.aclose()
                await gateway.a2a.aclose()
                await gateway.budget_store.aclose()
                # Commit what the audit writer still holds before the process goes.
                await anyio.to_thread.run_sync(gateway.audit_log.close)
                if gateway.tracing is not None:
                    await anyio.to_thread.run_sync(gateway.tracing.shutdown)

    return run


async def _poll_registry(registry: RegistryStore, pins: Pins | None = None) -> None:
    # Writes from other processes (the CLI, other nodes) bump a version row; pick them up.
    while True:
        await anyio.sleep(REGISTRY_POLL_S)
        try:
            await anyio.to_thread.run_sync(registry.refresh)
            if pins is not None:  # approvals made elsewhere
                await anyio.to_thread.run_sync(pins.refresh)
        except Exception:
            log.exception("registry refresh failed; serving the last snapshot")
