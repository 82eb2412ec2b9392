"""Stop signals held from the first moment of ``jobworker serve``.

PID 1 of a PID namespace (a container's entrypoint) is sent only the signals it has a handler
for: a SIGTERM meeting the default disposition is dropped, and ``docker stop`` then waits its
timeout and kills. A stop may also come while the server is still importing its modules,
creating its PKI or setting up its cgroups. So the ``jobworker`` entry point calls
:func:`hold_stop_signals` before any slow import when the command is ``serve``: SIGTERM and
SIGINT are recorded from then on, and :func:`jobworker.server.app.serve`, once its own handlers
have taken over, does not start serving when one was held, and returns (exit code 0).

This module imports nothing but the standard library's ``signal``: it must stay cheap.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Final

__all__ = ["STOP_SIGNALS", "held_stop_signal", "hold_stop_signals"]

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

_held: list[int] = []


def hold_stop_signals() -> None:
    """Record SIGTERM and SIGINT instead of dying (or raising KeyboardInterrupt)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _hold)


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def held_stop_signal() -> signal.Signals | None:
    """The first stop signal held by :func:`hold_stop_signals`, if any came."""
    return signal.Signals(_held[0]) if _held else None
