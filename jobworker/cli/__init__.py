"""The jobworker command line (the typer app is ``jobworker.cli.app.app``).

This module stays cheap to import: :func:`main` is the console script, and for ``serve`` it
takes over SIGTERM and SIGINT before the slow imports (see ``jobworker.server.signals``).
``--version`` and the top-level ``--help`` load nothing else (``_help.py`` keeps the help).
Help and usage errors are plain text without typer's rich formatting, the same with any
rich release (and rich is not imported).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["command_name", "main"]

# Global options that take a value; they come before the command.
_VALUE_OPTIONS = frozenset({"--server", "--cert", "--key", "--ca", "--timeout"})


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


def _terminal_columns() -> int:
    """The terminal's width as click measures it (``shutil.get_terminal_size``, without
    loading shutil)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def main() -> None:
    """The ``jobworker`` command."""
    if sys.argv[1:] == ["--version"]:  # without loading the CLI: scripts ask this often
        from jobworker import __version__  # noqa: PLC0415 - the package alone

        print(f"jobworker {__version__}")
        return
    if sys.argv[1:] in (["--help"], ["-h"]) and _terminal_columns() >= 80:
        # As typer renders it at this width (a test keeps the copy true), without typer.
        from jobworker.cli._help import TEXT  # noqa: PLC0415 - only here

        sys.stdout.write(TEXT)
        return
    command = command_name(sys.argv[1:])
    if command == "serve":
        from jobworker.server.signals import hold_stop_signals  # noqa: PLC0415 - cheap first

        hold_stop_signals()
    os.environ.setdefault("TYPER_USE_RICH", "0")
    from jobworker.cli.app import main as run  # noqa: PLC0415 - after the signals

    run()
