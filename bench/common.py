"""Small helpers shared by the benchmark's processes (run.py, client.py, baseline.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys


def run(coro, uvloop: bool = True):
    """Run *coro* to completion, on uvloop when it is installed and wanted."""
    try:
        import uvloop as uvloop_mod
    except ImportError:
        uvloop_mod = None
    if uvloop_mod is None or not uvloop:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop_mod.new_event_loop) as runner:
            return runner.run(coro)
    uvloop_mod.install()
    return asyncio.run(coro)


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM *process* and wait; SIGKILL it if it still runs after *grace* seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
