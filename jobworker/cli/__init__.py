"""The jobworker command line (the typer app is ``jobworker.cli.app.app``).

This module stays cheap to import: :func:`main` is the console script, and for ``serve`` it
takes over SIGTERM and SIGINT before the slow imports (see ``jobworker.server.signals``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["command_name", "main"]

# Global options that take a value; they come before the command.
_VALUE_OPTIONS = frozenset({"--server", "--cert", "--key", "--ca"})


def command_name(args: Sequence[str]) -> str | None:
    """The command word of a ``jobworker`` command line (its arguments without argv[0])."""
    expect_value = False
    for arg in args:
        if expect_value:
            expect_value = False
        elif arg == "--":
            return None
        elif arg in _VALUE_OPTIONS:
            expect_value = True
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    """The ``jobworker`` command."""
    if command_name(sys.argv[1:]) == "serve":
        from jobworker.server.signals import hold_stop_signals  # noqa: PLC0415 - cheap first

        hold_stop_signals()
    from jobworker.cli.app import main as run  # noqa: PLC0415 - after the signals

    run()
