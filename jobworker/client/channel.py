"""The client's gRPC channel: grpclib's, with connections that accept large HTTP/2 frames.

HTTP/2 lets a receiver say how large a DATA frame it accepts (SETTINGS_MAX_FRAME_SIZE); the
default is 16 KiB and grpclib never changes it. The server then cuts every output chunk into
16 KiB frames, and both ends handle each frame in Python (h2), which is most of the cost of
streaming output. A client that accepts frames of up to :data:`MAX_FRAME_SIZE` receives each
chunk in one frame.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final

from grpclib.client import Channel, Handler
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes

__all__ = ["MAX_FRAME_SIZE", "open_channel"]

MAX_FRAME_SIZE: Final = 1024 * 1024  # of the 2**24 - 1 that HTTP/2 allows


class _LargeFrames(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connection._connection.update_settings({SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE})
        self.connection.flush()


class _Channel(Channel):
    def _protocol_factory(self) -> H2Protocol:  # grpclib's one hook for its protocol object
        return _LargeFrames(Handler(), self._config, self._h2_config)


def open_channel(host: str, port: int, ssl_context: ssl.SSLContext) -> Channel:
    """A grpclib channel to ``host:port`` whose connections accept large DATA frames."""
    return _Channel(host, port, ssl=ssl_context)
