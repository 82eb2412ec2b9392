"""The server's message codec: grpclib's, with output chunks encoded by hand.

A ``StreamJobOutput`` response is nearly all data: up to a chunk (256 KiB by default) of the
job's output. betterproto2 builds its encoding field by field through an intermediate
buffer, about 50 µs for a full chunk, and every stream sends four of those a MiB. An
:class:`OutputChunk` has three scalar fields, so :func:`encode_chunk` writes the same bytes
directly: each field's tag and varint, and the data copied once. Every other message goes
through betterproto2 as before. ``tests/test_codec.py`` checks that both encodings are the
same bytes.
"""

from __future__ import annotations

from typing import Any, Final

from grpclib.encoding.proto import ProtoCodec

from jobworker.models import OutputChunk

__all__ = ["EncodedChunk", "ServerCodec", "encode_chunk"]

# Field tags of jobworker.v1.OutputChunk (protos/): field number << 3 | wire type.
_OFFSET: Final = b"\x08"  # 1, varint
_DATA: Final = b"\x12"  # 2, length-delimited
_DROPPED: Final = b"\x18"  # 3, varint


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(chunk: OutputChunk) -> bytes:
    """The protobuf encoding of the ``jobworker.v1.OutputChunk`` that carries ``chunk``, as
    betterproto2 writes it: fields in number order, those at their default left out."""
    parts: list[bytes | memoryview] = []
    if chunk.offset:
        parts += (_OFFSET, _varint(chunk.offset))
    if chunk.data:
        parts += (_DATA, _varint(len(chunk.data)), chunk.data)
    if chunk.dropped:
        parts += (_DROPPED, _varint(chunk.dropped))
    return b"".join(parts)


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
