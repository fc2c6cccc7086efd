"""A process that dies by SIGKILL at a chosen point: what survives a crash is what tests check."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

__all__ = ["kill_when_ready"]

ROOT = Path(__file__).resolve().parents[2]


async def kill_when_ready(script: str, *args: str, ready: bytes, wait_s: float = 30.0) -> None:
    """Run `python -c script args...` from the repository root until it prints the line `ready`, then
    kill it with SIGKILL (no shutdown, no flush) and reap it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), wait_s)
        assert line.strip() == ready, f"the process printed {line!r}, not {ready!r}"
    finally:
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)
