"""How the benchmark's helper processes (the TLS sender, the grpcio peer) learn to stop: the
benchmark closes their standard input."""

from __future__ import annotations

import asyncio
import os
import sys

__all__ = ["stdin_closed"]


async def stdin_closed() -> None:
    """Return once this process's standard input reaches its end."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            closed.set()

    loop.add_reader(fd, on_stdin)
    await closed.wait()
