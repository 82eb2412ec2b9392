"""The server's hand-encoded output chunks are the bytes betterproto2 would write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker._chunk_wire import decode_chunk, encode_chunk
from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import ProtocolError, chunk_from_proto, chunk_to_proto
from jobworker.models import OutputChunk
from jobworker.server.codec import EncodedChunk, ServerCodec

_UINT64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
# Any instant a datetime can hold, as the wire carries it: aware, in UTC.
_TIMES = st.none() | st.datetimes(timezones=st.just(UTC)).map(lambda t: t.astimezone(UTC))


@given(offset=_UINT64, data=st.binary(max_size=4096), dropped=_UINT64, written_at=_TIMES)
def test_a_chunk_encodes_as_betterproto2_encodes_it(
    offset: int, data: bytes, dropped: int, written_at: datetime | None
) -> None:
    chunk = OutputChunk(offset=offset, data=data, dropped=dropped, written_at=written_at)
    wire = encode_chunk(chunk)
    assert wire == bytes(chunk_to_proto(chunk))
    assert chunk_from_proto(pb.OutputChunk.parse(wire)) == chunk
    assert decode_chunk(wire) == chunk


def test_a_full_chunk_and_the_edges() -> None:
    for chunk in [
        OutputChunk(offset=0, data=b""),
        OutputChunk(offset=(1 << 63) - 1, data=b"x" * (256 << 10)),
        OutputChunk(offset=127, data=b"", dropped=128),
        OutputChunk(offset=128, data=memoryview(b"abc").tobytes()),
        OutputChunk(offset=1, data=b"x", written_at=datetime(1970, 1, 1, tzinfo=UTC)),
        OutputChunk(offset=1, data=b"x", written_at=datetime(1969, 12, 31, 23, 59, tzinfo=UTC)),
        OutputChunk(offset=1, data=b"x", written_at=datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
    ]:
        assert encode_chunk(chunk) == bytes(chunk_to_proto(chunk))


def test_the_codec_passes_encoded_chunks_through_and_encodes_the_rest() -> None:
    codec = ServerCodec()
    chunk = OutputChunk(offset=5, data=b"hello")
    assert codec.encode(EncodedChunk(chunk), pb.OutputChunk) == bytes(chunk_to_proto(chunk))
    status = pb.GetJobStatusRequest(job_id="x")
    assert codec.encode(status, pb.GetJobStatusRequest) == bytes(status)


@given(st.binary(max_size=64))
def test_any_bytes_decode_as_betterproto2_reads_them_or_are_a_protocol_error(raw: bytes) -> None:
    try:
        chunk = decode_chunk(raw)
    except ProtocolError:
        return  # never another exception, whatever the server sends
    # What decodes is what betterproto2 reads from the same bytes (it may be more lenient).
    assert chunk == chunk_from_proto(pb.OutputChunk.parse(raw))


def test_unknown_fields_are_skipped_and_a_truncated_chunk_is_refused() -> None:
    wire = encode_chunk(OutputChunk(offset=7, data=b"abc"))
    # Fields 8 to 11, one of each wire type, which this version does not know.
    extra = b"\x40\x05" + b"\x4a\x02hi" + b"\x51" + bytes(8) + b"\x5d" + bytes(4)
    assert decode_chunk(wire + extra) == OutputChunk(offset=7, data=b"abc")
    for cut in (1, 3, len(wire) - 1):
        with pytest.raises(ProtocolError):
            decode_chunk(wire[:cut])
    with pytest.raises(ProtocolError, match="over 10 bytes"):
        decode_chunk(b"\x08" + b"\xff" * 11)


def test_a_time_in_another_zone_is_the_same_instant_and_a_bad_time_is_refused() -> None:
    here = datetime(2026, 11, 29, 17, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    wire = encode_chunk(OutputChunk(offset=0, data=b"a", written_at=here))
    assert wire == bytes(chunk_to_proto(OutputChunk(offset=0, data=b"a", written_at=here)))
    assert decode_chunk(wire).written_at == here  # equal instants; UTC on the way back
    assert decode_chunk(wire).written_at.tzinfo is UTC  # type: ignore[union-attr]
    with pytest.raises(TypeError):  # a naive datetime names no instant
        encode_chunk(OutputChunk(offset=0, data=b"a", written_at=datetime(2026, 1, 1)))
    twice = b"\x22\x02\x08\x05" + b"\x22\x03\x10\xe8\x07"  # 5 s, then 1 µs
    assert decode_chunk(twice) == chunk_from_proto(pb.OutputChunk.parse(twice))
    base = encode_chunk(OutputChunk(offset=0, data=b"a"))
    for timestamp in (
        b"\x10\x80\x94\xeb\xdc\x03",  # nanos 1e9: out of range
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # seconds far beyond year 9999
        b"\x08",  # cut short
    ):
        with pytest.raises(ProtocolError):
            decode_chunk(base + b"\x22" + bytes([len(timestamp)]) + timestamp)
