"""Malformed and oversized requests: the right status, one audit line, and nothing kept.

Each request is hand-made: the gRPC 5-byte prefix and the protobuf bytes are written out
here, not produced by a library that would refuse to produce them.
"""

from __future__ import annotations

import logging
import re

import anyio
import pytest
from conftest import (
    FD_MARGIN,
    FULL,
    RSS_MARGIN,
    AbusePki,
    audit_lines,
    served,
    usage,
)
from h2raw import WORKER, RawH2, frame

from jobworker._proto.jobworker import v1 as pb
from jobworker.errors import InvalidArgument
from jobworker.server.app import JobworkerServer

pytestmark = [pytest.mark.abuse, pytest.mark.anyio]

INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8

START = WORKER + "StartJob"
STATUS = WORKER + "GetJobStatus"
STREAM = WORKER + "StreamJobOutput"
GOOD_START = bytes(pb.StartJobRequest(program="true"))

# name: (path, the DATA bytes or None for none at all, the reason the server must give)
MALFORMED: dict[str, tuple[str, bytes | None, str]] = {
    "non-UTF-8 string": (START, frame(b"\x0a\x02\xff\xfe"), "not valid UTF-8"),
    "11-byte varint": (STREAM, frame(b"\x10" + b"\xff" * 10 + b"\x01"), "longer than 10 bytes"),
    "varint beyond 64 bits": (STREAM, frame(b"\x10" + b"\xff" * 9 + b"\x7f"), "larger than 64"),
    "string sent as a varint": (START, frame(b"\x08\x05"), "program) has wire type varint"),
    "limits sent as a varint": (START, frame(b"\x18\x05"), "limits) has wire type varint"),
    "a limit of the wrong wire type": (
        START,
        frame(b"\x1a\x02\x0a\x00"),
        "memory_bytes) has wire type length-delimited",
    ),
    "uint32 limit above 32 bits": (
        START,
        frame(b"\x1a\x06\x18\xff\xff\xff\xff\x1f"),
        "larger than a uint32",
    ),
    "a field cut short": (START, frame(b"\x0a\x05ab"), "needs 5 bytes"),
    "a group": (START, frame(b"\x0b"), "wire type 3"),
    "compressed flag, no encoding": (START, frame(GOOD_START, flag=1), "compressed"),
    "invalid flag byte": (START, frame(GOOD_START, flag=7), "flag byte 7"),
    "prefix longer than the body": (
        START,
        frame(GOOD_START, length=len(GOOD_START) + 100),
        "ended before the",
    ),
    "3-byte prefix": (STATUS, b"\x00\x00\x00", "ended before its 5-byte message prefix"),
    "unary call with no message": (STATUS, None, "carried no request message"),
}


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_request_is_invalid_argument_and_audited(
    server: JobworkerServer,
    abuse_pki: AbusePki,
    audit_log: pytest.LogCaptureFixture,
    case: str,
) -> None:
    path, data, reason = MALFORMED[case]
    raw = await RawH2.open(server.port, abuse_pki.context())
    try:
        reply = await raw.call(path, data)
    finally:
        await raw.aclose()
    assert reply.status == INVALID_ARGUMENT, (reply.headers, reply.reset)
    assert reason in reply.message
    rpc = path.rsplit("/", 1)[1]
    (line,) = audit_lines(audit_log)
    assert line.startswith(f"audit who=admin role=admin rpc={rpc} job=- outcome=invalid_argument")
    assert re.search(r" peer=127\.0\.0\.1:\d+ serial=[0-9A-F]+$", line)
    assert errors_logged(audit_log) == [], "no traceback, no internal error"
    await served(abuse_pki, server.port)
    async with abuse_pki.client(server.port) as client:
        assert await client.list() == [], "no job was started"


async def test_an_oversized_message_is_refused_before_its_body_is_read(
    server: JobworkerServer, abuse_pki: AbusePki, audit_log: pytest.LogCaptureFixture
) -> None:
    await served(abuse_pki, server.port)
    before = usage()
    raw = await RawH2.open(server.port, abuse_pki.context())
    try:
        # The prefix announces 256 MiB; 8 MiB of it follow, as far as flow control allows.
        stream_id = await raw.start(START)
        body = frame(b"\x0a" + b"\x00" * (8 << 20), length=256 << 20)
        with anyio.fail_after(20):
            await raw.send(stream_id, body[: 8 << 20], end=False)
        reply = await raw.wait(stream_id)
    finally:
        await raw.aclose()
    assert reply.status == RESOURCE_EXHAUSTED
    assert reply.message == (
        f"the request message is {256 << 20} bytes; this server accepts at most {4 << 20} bytes"
    )
    (line,) = [line for line in audit_lines(audit_log) if " rpc=StartJob " in line]
    assert " job=- outcome=resource_exhausted " in line
    after = usage()
    # Never buffered: far less than the 8 MiB sent, let alone the 256 MiB announced.
    assert after.rss - before.rss < RSS_MARGIN
    await served(abuse_pki, server.port)


async def test_a_message_at_the_limit_is_still_read(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    # A 4 MiB StartJob (one huge argument) is read and judged on its content: no kernel takes
    # such an argument (E2BIG), which is the caller's fault, not a retry.
    request = bytes(pb.StartJobRequest(program="true", args=["x" * ((4 << 20) - 64)]))
    assert len(request) <= 4 << 20
    raw = await RawH2.open(server.port, abuse_pki.context())
    try:
        reply = await raw.call(START, frame(request), seconds=30)
    finally:
        await raw.aclose()
    assert reply.status == INVALID_ARGUMENT
    assert "bytes long; the most is 131071" in reply.message


async def test_e2big_is_invalid_argument_not_unavailable(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    async with abuse_pki.client(server.port) as client:
        with pytest.raises(InvalidArgument, match="the most is 131071"):
            await client.start("true", ["y" * 200_000])  # above the kernel's 128 KiB per arg
        assert await client.list() == []


async def test_an_offset_past_any_file_on_a_running_job_is_invalid_argument(
    server: JobworkerServer, abuse_pki: AbusePki, audit_log: pytest.LogCaptureFixture
) -> None:
    async with abuse_pki.client(server.port) as client:
        job = await client.start("sleep", ["30"])
        raw = await RawH2.open(server.port, abuse_pki.context())
        try:
            for offset in ((1 << 63) - 1, (1 << 64) - 1):
                request = bytes(pb.StreamJobOutputRequest(job_id=job.id, offset=offset))
                reply = await raw.call(STREAM, frame(request))
                assert reply.status == INVALID_ARGUMENT, reply.headers
                assert "beyond the largest output" in reply.message
        finally:
            await raw.aclose()
        assert (await client.status(job.id)).state.name == "RUNNING", "the job is untouched"
        await client.stop(job.id)
    assert errors_logged(audit_log) == []


async def test_malformed_requests_leave_memory_and_fds_at_their_baseline(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    rounds = 40 if FULL else 4
    raw = await RawH2.open(server.port, abuse_pki.context())
    for path, data, _ in MALFORMED.values():  # warm-up: first use allocates caches
        await raw.call(path, data)
    await served(abuse_pki, server.port)
    before = usage()
    try:
        with anyio.fail_after(60 if FULL else 20):
            for _ in range(rounds):
                for path, data, _ in MALFORMED.values():
                    assert (await raw.call(path, data)).status == INVALID_ARGUMENT
    finally:
        await raw.aclose()
    await served(abuse_pki, server.port)
    after = usage()
    assert after.rss - before.rss < RSS_MARGIN
    assert after.fds - before.fds <= FD_MARGIN
