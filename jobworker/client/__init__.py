"""The async client library for the jobworker gRPC API (asyncio only).

The models it takes and returns (``Limits``, ``JobStatus``, ``JobState``, ``Network``,
``parse_size``…) live in :mod:`jobworker.models`, the errors in :mod:`jobworker.errors`.
"""

from jobworker.client.client import DEFAULT_RECONNECT_FOR, DEFAULT_STOP_GRACE, Client, OutputReader
from jobworker.client.config import DEFAULT_SERVER, DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_RECONNECT_FOR",
    "DEFAULT_SERVER",
    "DEFAULT_STOP_GRACE",
    "DEFAULT_TIMEOUT",
    "Client",
    "OutputReader",
]
