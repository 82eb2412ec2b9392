"""The async client library for the jobworker gRPC API (asyncio only).

The models it takes and returns (``Limits``, ``JobStatus``, ``JobState``, ``Network``,
``parse_size``…) live in :mod:`jobworker.models`, the errors in :mod:`jobworker.errors`.
:class:`Client` and :class:`OutputReader` are loaded on first use, so that a program that needs
only the defaults (the CLI's ``--help``) does not load gRPC and the message classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobworker.client.config import (
    DEFAULT_RECONNECT_FOR,
    DEFAULT_SERVER,
    DEFAULT_STOP_GRACE,
    DEFAULT_TIMEOUT,
)

if TYPE_CHECKING:
    from jobworker.client.client import Client, OutputReader

__all__ = [
    "DEFAULT_RECONNECT_FOR",
    "DEFAULT_SERVER",
    "DEFAULT_STOP_GRACE",
    "DEFAULT_TIMEOUT",
    "Client",
    "OutputReader",
]


def __getattr__(name: str) -> Any:
    if name in ("Client", "OutputReader"):
        from jobworker.client import client  # noqa: PLC0415 - loaded on first use

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
