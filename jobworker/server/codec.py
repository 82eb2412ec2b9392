"""The server's message codec: grpclib's, with output chunks encoded by hand.

:class:`EncodedChunk` carries a chunk already encoded by :func:`encode_chunk`
(``jobworker/_chunk_wire.py``: the same bytes as betterproto2's, several times faster); the
codec passes it through as it is and encodes every other message with betterproto2.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from jobworker._chunk_wire import encode_chunk
from jobworker.models import OutputChunk

__all__ = ["EncodedChunk", "ServerCodec"]


class EncodedChunk:
    """An output chunk already encoded, sent as a ``jobworker.v1.OutputChunk``."""

    __slots__ = ("wire",)

    def __init__(self, chunk: OutputChunk) -> None:
        self.wire = encode_chunk(chunk)


class ServerCodec(ProtoCodec):
    """grpclib's protobuf codec, which passes an :class:`EncodedChunk` through as it is."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if type(message) is EncodedChunk:
            return message.wire
        return super().encode(message, message_type)
