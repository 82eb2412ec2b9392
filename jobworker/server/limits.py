"""The server's limits against hostile or broken clients, in one place, with their defaults.

Each limit bounds what one client can make the server hold. When one is hit, the server
logs a line (and an audit line where a call is involved) and refuses only the offending
request or connection; every other client goes on being served. ``docs/security.md`` lists
them with what the abuse tests measured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from jobworker.errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "ServerLimits"]

DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Limits on requests, connections and HTTP/2 streams.

    * ``max_message_size``: the largest request message, in bytes; a larger one is refused
      with RESOURCE_EXHAUSTED before its body is read.
    * ``handshake_timeout``: seconds a new connection has to complete its TLS handshake.
    * ``max_connections``: open connections in all (handshakes in progress included);
      ``max_connections_per_peer``: the same from one IP address. A connection over either
      is closed at once, before its handshake.
    * ``max_concurrent_streams``: calls open at once on one connection (HTTP/2
      SETTINGS_MAX_CONCURRENT_STREAMS).
    * ``max_resets`` within ``reset_window`` seconds: streams a client may reset on one
      connection; beyond that the connection gets GOAWAY (ENHANCE_YOUR_CALM) and is closed.
    * ``max_running_jobs_per_user`` and ``max_streams_per_user``: jobs running and output
      streams open at once for one ``user`` identity (name and role); one more is refused
      with RESOURCE_EXHAUSTED. Admins are not counted.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    handshake_timeout: float = 5.0
    max_connections: int = 1024
    max_connections_per_peer: int = 128
    max_concurrent_streams: int = 100
    max_resets: int = 200
    reset_window: float = 10.0
    max_running_jobs_per_user: int = 1000
    max_streams_per_user: int = 1000

    def validate(self) -> ServerLimits:
        """Return self, or raise ConfigError naming the first value out of range."""
        for field in fields(self):
            value = getattr(self, field.name)
            if value <= 0:
                raise ConfigError(f"{field.name} must be positive, not {value}")
        if self.max_message_size > (1 << 32) - 1:
            raise ConfigError(
                f"max_message_size must be below 4 GiB (the gRPC length prefix), "
                f"not {self.max_message_size}"
            )
        if self.max_connections_per_peer > self.max_connections:
            raise ConfigError("max_connections_per_peer must not exceed max_connections")
        return self
