"""A strict check of protobuf wire bytes against a betterproto2 message class.

betterproto2's parser is lenient: a field sent with the wrong wire type becomes a value of
the wrong Python type (``program=5``), a truncated field is silently cut, an oversized
varint becomes an integer beyond 64 bits. Such a message would reach the service and fail
there as an internal error. :func:`check_wire` walks the bytes first and raises
:class:`~jobworker.errors.InvalidMessage` with a reason a person can act on:

* every tag, varint and length is complete and in range (a varint has at most 10 bytes
  and fits in 64 bits; a field number is 1 to 2^29-1; groups are not accepted);
* every known field has the wire type of its declared type (packed repeated scalars are
  accepted too), a 32-bit integer fits in 32 bits, a string is UTF-8;
* embedded messages are checked the same way, recursively.

Unknown fields are skipped once their structure is checked, as protobuf requires.
"""

from __future__ import annotations

from typing import Any, Final

import betterproto2

from jobworker.errors import InvalidMessage

__all__ = ["check_wire"]

_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5

_WIRE_NAMES: Final = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group start",
                      4: "group end", 5: "32-bit"}  # fmt: skip

_VARINT_TYPES: Final = {
    betterproto2.TYPE_INT32, betterproto2.TYPE_INT64, betterproto2.TYPE_UINT32,
    betterproto2.TYPE_UINT64, betterproto2.TYPE_SINT32, betterproto2.TYPE_SINT64,
    betterproto2.TYPE_BOOL, betterproto2.TYPE_ENUM,
}  # fmt: skip
_I64_TYPES: Final = {betterproto2.TYPE_FIXED64, betterproto2.TYPE_SFIXED64,
                     betterproto2.TYPE_DOUBLE}  # fmt: skip
_I32_TYPES: Final = {betterproto2.TYPE_FIXED32, betterproto2.TYPE_SFIXED32,
                     betterproto2.TYPE_FLOAT}  # fmt: skip
_UNSIGNED_32: Final = {betterproto2.TYPE_UINT32}
_MAX_FIELD: Final = (1 << 29) - 1
_MAX_DEPTH: Final = 32


def _wire_type_of(proto_type: str) -> int:
    if proto_type in _VARINT_TYPES:
        return _VARINT
    if proto_type in _I64_TYPES:
        return _I64
    if proto_type in _I32_TYPES:
        return _I32
    return _LEN


class _Reader:
    def __init__(self, data: bytes | memoryview, where: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.where = where

    def fail(self, reason: str) -> InvalidMessage:
        return InvalidMessage(f"the request is not a valid {self.where}: {reason}")

    def varint(self, what: str) -> int:
        value = 0
        for i in range(10):
            if self.pos >= len(self.data):
                raise self.fail(f"{what} ends inside a varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value >> 64:
                    raise self.fail(f"{what} is a varint larger than 64 bits")
                return value
        raise self.fail(f"{what} is a varint longer than 10 bytes")

    def take(self, size: int, what: str) -> memoryview:
        if size > len(self.data) - self.pos:
            raise self.fail(f"{what} needs {size} bytes, only {len(self.data) - self.pos} remain")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk


def check_wire(data: bytes | memoryview, message_type: type[betterproto2.Message]) -> None:
    """Raise :class:`InvalidMessage` unless ``data`` is a well-formed ``message_type``."""
    _check(_Reader(data, message_type.__name__), message_type, 0)


def _check(reader: _Reader, message_type: type[betterproto2.Message], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise reader.fail("messages are nested too deeply")
    meta: Any = getattr(message_type, "_betterproto")  # noqa: B009 - betterproto2's field table
    while reader.pos < len(reader.data):
        key = reader.varint("a field tag")
        number, wire = key >> 3, key & 7
        if not 1 <= number <= _MAX_FIELD:
            raise reader.fail(f"field number {number} is out of range")
        name = meta.field_name_by_number.get(number)
        what = f"field {number} ({name})" if name else f"field {number}"
        if wire in (3, 4) or wire not in _WIRE_NAMES:
            raise reader.fail(f"{what} has wire type {wire}, which is not accepted")
        if name is None:
            _skip(reader, wire, what)
            continue
        field = meta.meta_by_field_name[name]
        expected = _wire_type_of(field.proto_type)
        packed = field.repeated and expected != _LEN and wire == _LEN
        if wire != expected and not packed:
            raise reader.fail(
                f"{what} has wire type {_WIRE_NAMES[wire]}, "
                f"its type {field.proto_type} needs {_WIRE_NAMES[expected]}"
            )
        if packed:
            size = reader.varint(f"the length of {what}")
            inner = _Reader(reader.take(size, what), reader.where)
            while inner.pos < len(inner.data):
                _scalar(inner, field.proto_type, expected, what)
        elif expected != _LEN:
            _scalar(reader, field.proto_type, expected, what)
        else:
            size = reader.varint(f"the length of {what}")
            value = reader.take(size, what)
            if field.proto_type == betterproto2.TYPE_STRING:
                try:
                    bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise reader.fail(f"{what} is not valid UTF-8") from None
            elif field.proto_type == betterproto2.TYPE_MESSAGE and field.unwrap is None:
                nested = meta.cls_by_field[name]
                _check(_Reader(value, f"{reader.where}.{name}"), nested, depth + 1)


def _scalar(reader: _Reader, proto_type: str, wire: int, what: str) -> None:
    if wire == _VARINT:
        value = reader.varint(what)
        if proto_type in _UNSIGNED_32 and value >> 32:
            raise reader.fail(f"{what} is {value}, larger than a {proto_type} can hold")
    else:
        reader.take(8 if wire == _I64 else 4, what)


def _skip(reader: _Reader, wire: int, what: str) -> None:
    if wire == _VARINT:
        reader.varint(what)
    elif wire == _LEN:
        reader.take(reader.varint(f"the length of {what}"), what)
    else:
        reader.take(8 if wire == _I64 else 4, what)
