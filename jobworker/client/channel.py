"""The client's gRPC channel: grpclib's, with connections that accept large HTTP/2 frames.

HTTP/2 lets a receiver say how large a DATA frame it accepts (SETTINGS_MAX_FRAME_SIZE); the
default is 16 KiB and grpclib never changes it. The server then cuts every output chunk into
16 KiB frames, and both ends handle each frame in Python (h2), which is most of the cost of
streaming output. A client that accepts frames of up to :data:`MAX_FRAME_SIZE` receives each
chunk in one frame.

h2 also builds, for its trace log and whether or not anything logs, the ``repr`` of every
frame it receives; for a DATA frame that copies the whole body and hex-encodes it, only to
keep the first 10 bytes. :func:`open_channel` replaces that ``repr`` (of hyperframe's
``DataFrame``, in the whole process) with one that hex-encodes just those bytes, and gives the
same text for unpadded frames, the only kind gRPC sends.

Output chunks are read by hand (``jobworker/_chunk_wire.py``): a stream asks for the model
:class:`~jobworker.models.OutputChunk` as its response type, and the codec decodes the wire
bytes straight into it; every other message is betterproto2's.

Error details (``grpc-status-details-bin``, where the server names an error's class) are
decoded with the google.rpc codec, whose modules are imported only when an error carries
details, so a call that succeeds never loads them.
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from collections.abc import Sequence
from typing import Any, Final

from grpclib.client import Channel, Handler
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from jobworker._chunk_wire import decode_chunk
from jobworker.models import OutputChunk

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


class _Codec(ProtoCodec):
    """grpclib's protobuf codec, which decodes an output chunk by hand into the model."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is OutputChunk:
            return decode_chunk(data)
        return super().decode(data, message_type)


class _LazyDetailsCodec(ProtoStatusDetailsCodec):
    """google.rpc status details, with the message types of error_details known."""

    def decode(self, status: Status, message: str | None, data: bytes) -> Sequence[Any]:
        import google.rpc.error_details_pb2  # type: ignore[import-untyped]  # noqa: F401, PLC0415

        return super().decode(status, message, data)


def _data_frame_body_repr(frame: DataFrame) -> str:
    if not frame.data:
        return "None"
    head = binascii.hexlify(bytes(frame.data[:11])).decode("ascii")
    return "<hex:" + (head[:20] + "..." if len(head) > 20 else head) + ">"


def open_channel(host: str, port: int, ssl_context: ssl.SSLContext) -> Channel:
    """A grpclib channel to ``host:port`` whose connections accept large DATA frames."""
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]
    return _Channel(
        host, port, ssl=ssl_context, codec=_Codec(), status_details_codec=_LazyDetailsCodec()
    )
