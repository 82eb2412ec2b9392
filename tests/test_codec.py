"""The server's hand-encoded output chunks are the bytes betterproto2 would write."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker._chunk_wire import decode_chunk, encode_chunk
from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import ProtocolError, chunk_from_proto, chunk_to_proto
from jobworker.models import OutputChunk
from jobworker.server.codec import EncodedChunk, ServerCodec

_UINT64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(offset=_UINT64, data=st.binary(max_size=4096), dropped=_UINT64)
def test_a_chunk_encodes_as_betterproto2_encodes_it(offset: int, data: bytes, dropped: int) -> None:
    chunk = OutputChunk(offset=offset, data=data, dropped=dropped)
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
    extra = b"\x20\x05" + b"\x2a\x02hi" + b"\x31" + bytes(8) + b"\x3d" + bytes(4)
    assert decode_chunk(wire + extra) == OutputChunk(offset=7, data=b"abc")
    for cut in (1, 3, len(wire) - 1):
        with pytest.raises(ProtocolError):
            decode_chunk(wire[:cut])
    with pytest.raises(ProtocolError, match="over 10 bytes"):
        decode_chunk(b"\x08" + b"\xff" * 11)
