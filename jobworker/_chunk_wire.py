"""The wire form of an output chunk (``jobworker.v1.OutputChunk``), written and read by hand.

A ``StreamJobOutput`` response is nearly all data: up to a chunk (256 KiB by default) of the
job's output, four of them for every MiB streamed. betterproto2 encodes a full chunk in about
53 µs and decodes it in about 25 µs, through intermediate buffers and a message object. The
message has three scalar fields, so these functions write and read the same bytes directly,
copying the data once. Both ends use them through their codecs (``server/codec.py``,
``client/channel.py``); every other message goes through betterproto2.
``tests/test_codec.py`` checks them against betterproto2.

Reading follows protobuf's rules as betterproto2 applies them: fields in any order, a
repeated field's last value wins (a message field's too: betterproto2 does not merge them),
and fields this version does not know are skipped; a known field with another wire
type, or anything else malformed, is a :class:`ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Final

from jobworker._proto_convert import ProtocolError
from jobworker.models import OutputChunk

__all__ = ["decode_chunk", "encode_chunk"]

# Field tags of jobworker.v1.OutputChunk (protos/): field number << 3 | wire type.
_OFFSET: Final = b"\x08"  # 1, varint
_DATA: Final = b"\x12"  # 2, length-delimited
_DROPPED: Final = b"\x18"  # 3, varint
_WRITTEN_AT: Final = b"\x22"  # 4, length-delimited: a google.protobuf.Timestamp
# ... and of google.protobuf.Timestamp.
_SECONDS: Final = b"\x08"  # 1, varint (int64)
_NANOS: Final = b"\x10"  # 2, varint (int32)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_UINT64_MAX: Final = (1 << 64) - 1
_FIELD_KINDS: Final = {1: _VARINT, 2: _LEN, 3: _VARINT, 4: _LEN}
_TIMESTAMP_KINDS: Final = {1: _VARINT, 2: _VARINT}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


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
    parts: list[bytes] = []
    if chunk.offset:
        parts += (_OFFSET, _varint(chunk.offset))
    if chunk.data:
        parts += (_DATA, _varint(len(chunk.data)), chunk.data)
    if chunk.dropped:
        parts += (_DROPPED, _varint(chunk.dropped))
    if chunk.written_at is not None:
        timestamp = _timestamp(chunk.written_at)
        parts += (_WRITTEN_AT, _varint(len(timestamp)), timestamp)
    return b"".join(parts)


def _timestamp(at: datetime) -> bytes:
    """The encoding of the google.protobuf.Timestamp of the aware datetime ``at``."""
    delta = at - _EPOCH  # a naive datetime is a TypeError: it names no instant
    seconds = delta.days * 86400 + delta.seconds
    nanos = delta.microseconds * 1000
    parts: list[bytes] = []
    if seconds:
        parts += (_SECONDS, _varint(seconds & _UINT64_MAX))  # int64: two's complement
    if nanos:
        parts += (_NANOS, _varint(nanos))
    return b"".join(parts)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("an output chunk from the server ends inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > _UINT64_MAX:
                raise ProtocolError("an output chunk from the server has a number over 64 bits")
            return value, pos
        shift += 7
        if shift >= 70:
            raise ProtocolError("an output chunk from the server has a number over 10 bytes")


def _fields(
    data: bytes, pos: int, end: int, kinds: dict[int, int]
) -> Iterator[tuple[int, int | bytes]]:
    """The fields of the message in ``data[pos:end]``: (number, value), in order, skipping
    those of a kind this reader does not use."""
    while pos < end:
        key, pos = _read_varint(data, pos)
        field, kind = key >> 3, key & 7
        if field == 0:
            raise ProtocolError("an output chunk from the server has a field numbered 0")
        if field in kinds and kind != kinds[field]:
            raise ProtocolError(f"field {field} of an output chunk has wire type {kind}")
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            yield field, value
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > end:
                raise ProtocolError("an output chunk from the server is cut short")
            if field in kinds:
                yield field, data[pos : pos + size]
            pos += size
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
            if pos > end:
                raise ProtocolError("an output chunk from the server is cut short")
        else:
            raise ProtocolError(f"an output chunk from the server has wire type {kind}")


def decode_chunk(data: bytes) -> OutputChunk:
    """The output chunk that the protobuf encoding ``data`` carries."""
    offset = dropped = 0
    payload = b""
    written_at: datetime | None = None
    for field, value in _fields(data, 0, len(data), _FIELD_KINDS):
        if field == 1:
            offset = int(value)
        elif field == 2:
            payload = bytes(value)
        elif field == 3:
            dropped = int(value)
        elif field == 4:
            written_at = _read_timestamp(bytes(value))  # the last one wins, as in betterproto2
    return OutputChunk(offset=offset, data=payload, dropped=dropped, written_at=written_at)


def _read_timestamp(data: bytes) -> datetime:
    """The datetime of the google.protobuf.Timestamp ``data``."""
    seconds = nanos = 0
    for field, value in _fields(data, 0, len(data), _TIMESTAMP_KINDS):
        if field == 1:
            seconds = int(value) - (1 << 64) if int(value) >> 63 else int(value)
        elif field == 2:
            nanos = int(value) & 0xFFFFFFFF
            nanos = nanos - (1 << 32) if nanos >> 31 else nanos
    if not 0 <= nanos < 1_000_000_000:
        raise ProtocolError(f"an output chunk's time has {nanos} nanoseconds")
    try:
        return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    except OverflowError:
        raise ProtocolError(f"an output chunk's time is out of range ({seconds} s)") from None
