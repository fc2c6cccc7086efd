"""Is an upstream there, and does it speak MCP? (`registry add` before it stores, `registry list`.)

The check connects as an MCP client (the SDK's, the era negotiated as the bridge does), lists the tools
and hangs up, within a time limit. A server whose credential is not `none` is not checked: its token
comes from a token service at call time, which a check from the command line has no business calling.
stdio servers are not started either: running a command is not a check.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from mcp import Client
from mcp.client.sse import sse_client

from agentgw.registry.models import McpServerSpec

__all__ = ["CHECK_TIMEOUT_S", "Health", "check", "check_all"]

CHECK_TIMEOUT_S = 10.0
MAX_SHOWN = 300


@dataclass(frozen=True)
class Health:
    """What a check found: `ok` True (it answered), False (it did not), None (not checked)."""

    ok: bool | None
    detail: str

    def text(self) -> str:
        if self.ok is None:
            return f"not checked ({self.detail})"
        return f"ready ({self.detail})" if self.ok else f"failing: {self.detail}"


def _leaf(exc: BaseException) -> BaseException:
    # The SDK's task groups wrap the error that matters (a refused connection, say) in groups.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _shown(exc: BaseException) -> str:
    leaf = _leaf(exc)
    text = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


async def check(spec: McpServerSpec, timeout_s: float = CHECK_TIMEOUT_S) -> Health:
    """Connect to `spec`'s upstream and list its tools."""
    if spec.transport == "stdio":
        return Health(None, "stdio: the command is not run to check it")
    if spec.credential.mode != "none":
        return Health(None, f"credential mode {spec.credential.mode}")
    assert spec.url is not None
    target = sse_client(spec.url, timeout=timeout_s) if spec.transport == "sse" else spec.url
    mode = "legacy" if spec.transport == "sse" else "auto"
    try:
        with anyio.fail_after(timeout_s):
            async with Client(target, mode=mode) as client:
                tools = await client.list_tools()
    except TimeoutError:
        return Health(False, f"no answer within {timeout_s:g}s")
    except Exception as exc:
        return Health(False, _shown(exc))
    return Health(True, f"{len(tools.tools)} tools")


async def check_all(specs: list[McpServerSpec], timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, Health]:
    """`check` of each enabled spec, at once."""
    found: dict[str, Health] = {}

    async def one(spec: McpServerSpec) -> None:
        found[spec.name] = await check(spec, timeout_s)

    async with anyio.create_task_group() as tasks:
        for spec in specs:
            if spec.enabled:
                tasks.start_soon(one, spec)
    return found
