"""The mapping between wire messages and models: exact round trips through real bytes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import (
    ProtocolError,
    chunk_from_proto,
    chunk_to_proto,
    limits_from_proto,
    limits_to_proto,
    spec_from_proto,
    spec_to_proto,
    state_from_proto,
    state_to_proto,
    status_from_proto,
    status_to_proto,
)
from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.models import (
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    Network,
    OutputChunk,
    Usage,
)

JOB_ID = "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"
STARTED = datetime(2026, 11, 28, 6, 15, 38, 682319, tzinfo=UTC)

FULL = JobStatus(
    id=JOB_ID,
    state=JobState.TERMINATED,
    owner="alice",
    program="/usr/bin/python3",
    args=("-c", "print('héllo')", ""),
    pid=4_194_303,
    started_at=STARTED,
    ended_at=STARTED + timedelta(seconds=3, microseconds=1),
    exit_code=None,
    signal=9,
    oom_killed=True,
    limits=Limits(
        memory_bytes=(1 << 63) - 1,
        cpu_millis=1_000_000,
        pids=4_194_304,
        io_read_bps=1,
        io_write_bps=123_456_789_012,
    ),
    unenforced=frozenset({"io_write_bps", "pids", "cpu_millis", "memory_bytes", "io_read_bps"}),
    usage=Usage(cpu_usec=(1 << 64) - 1, memory_peak_bytes=52_428_800),
    env={"GREETING": "héllo", "EMPTY": ""},
    cwd="/srv/work dir",
    user="root",
    uid=(1 << 32) - 2,
    network=Network.NONE,
    max_output=1 << 62,
    output_bytes=(1 << 64) - 1,
    output_dropped=(1 << 63) + 5,
    output_lost=True,
)

MINIMAL = JobStatus(
    id=JOB_ID,
    state=JobState.RUNNING,
    owner="",
    program="true",
    args=(),
    pid=0,
    started_at=datetime(1970, 1, 1, tzinfo=UTC),
)


def _wire(message: pb.JobStatus) -> pb.JobStatus:
    """Serialize and parse again, as the other end of a connection would see it."""
    return pb.JobStatus.parse(bytes(message))


@pytest.mark.parametrize("status", [FULL, MINIMAL], ids=["full", "minimal"])
def test_status_round_trips_through_bytes(status: JobStatus) -> None:
    back = status_from_proto(_wire(status_to_proto(status)))
    assert back == status
    assert back.started_at.tzinfo is UTC
    assert back.ended_at is None or back.ended_at.tzinfo is UTC


def test_status_round_trip_inside_a_response() -> None:
    response = pb.ListJobsResponse(jobs=[status_to_proto(FULL), status_to_proto(MINIMAL)])
    parsed = pb.ListJobsResponse.parse(bytes(response))
    assert [status_from_proto(s) for s in parsed.jobs] == [FULL, MINIMAL]


def test_minimal_status_leaves_optional_fields_absent_on_the_wire() -> None:
    wire = _wire(status_to_proto(MINIMAL))
    assert wire.exit_code is None
    assert wire.signal is None
    assert wire.ended_at is None
    assert wire.limits is not None
    assert bytes(wire.limits) == b""
    assert wire.usage is not None
    assert wire.usage.cpu_usec is None
    assert wire.usage.memory_peak_bytes is None


def test_zero_exit_code_and_signal_are_not_confused_with_unset() -> None:
    status = JobStatus(
        id=JOB_ID,
        state=JobState.COMPLETED,
        owner="bob",
        program="true",
        args=(),
        pid=42,
        started_at=STARTED,
        ended_at=STARTED,
        exit_code=0,
        signal=None,
        usage=Usage(cpu_usec=0, memory_peak_bytes=None),
    )
    back = status_from_proto(_wire(status_to_proto(status)))
    assert back.exit_code == 0
    assert back.signal is None
    assert back.usage == Usage(cpu_usec=0, memory_peak_bytes=None)


def test_unenforced_is_sent_sorted_and_comes_back_as_a_frozenset() -> None:
    wire = _wire(status_to_proto(FULL))
    assert wire.unenforced_limits == [
        "cpu_millis",
        "io_read_bps",
        "io_write_bps",
        "memory_bytes",
        "pids",
    ]
    back = status_from_proto(wire)
    assert isinstance(back.unenforced, frozenset)
    assert back.unenforced == FULL.unenforced


def test_times_in_other_zones_arrive_as_the_same_instant_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    status = JobStatus(
        id=JOB_ID,
        state=JobState.RUNNING,
        owner="a",
        program="p",
        args=(),
        pid=1,
        started_at=datetime(2026, 1, 1, 12, 0, 0, 5, tzinfo=plus_two),
    )
    back = status_from_proto(_wire(status_to_proto(status)))
    assert back.started_at == datetime(2026, 1, 1, 10, 0, 0, 5, tzinfo=UTC)
    assert back.started_at.tzinfo is UTC


NAIVE = datetime(2026, 1, 1, 12, 0, 0)  # no tzinfo, on purpose


@pytest.mark.parametrize(
    ("status", "field"),
    [
        (dataclasses.replace(FULL, started_at=NAIVE), "started_at"),
        (dataclasses.replace(FULL, ended_at=NAIVE), "ended_at"),
    ],
    ids=["started_at", "ended_at"],
)
def test_naive_times_are_refused(status: JobStatus, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a timezone-aware"):
        status_to_proto(status)


@pytest.mark.parametrize("state", list(JobState))
def test_every_state_round_trips(state: JobState) -> None:
    status = JobStatus(
        id=JOB_ID, state=state, owner="a", program="p", args=(), pid=1, started_at=STARTED
    )
    wire = _wire(status_to_proto(status))
    assert wire.state == state_to_proto(state)
    assert wire.state.name == state.name
    assert status_from_proto(wire).state is state


def test_state_mapping_covers_every_wire_state_but_unspecified() -> None:
    wire_states = {s for s in pb.JobState if s is not pb.JobState.UNSPECIFIED}
    assert {state_to_proto(s) for s in JobState} == wire_states
    assert {state_from_proto(s) for s in wire_states} == set(JobState)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (0, r"JOB_STATE_UNSPECIFIED \(0\) is not a valid job state"),
        (7, r"unknown value 7 is not a valid job state"),
        (2**32 - 1, r"unknown value 4294967295 is not a valid job state"),
    ],
)
def test_unspecified_or_unknown_state_from_the_wire_is_a_clear_error(
    raw: int, message: str
) -> None:
    good = bytes(status_to_proto(MINIMAL))
    # Append field 2 (state, varint) again: the last value on the wire wins.
    tag = bytes([2 << 3 | 0])
    varint = bytearray()
    value = raw
    while True:
        byte, value = value & 0x7F, value >> 7
        varint.append(byte | (0x80 if value else 0))
        if not value:
            break
    wire = pb.JobStatus.parse(good + tag + bytes(varint))
    assert int(wire.state) == raw
    with pytest.raises(ProtocolError, match=message) as caught:
        status_from_proto(wire)
    assert isinstance(caught.value, JobworkerError)
    assert "JOB_STATE_RUNNING (1)" in str(caught.value)


def test_status_without_start_time_is_a_clear_error() -> None:
    wire = _wire(status_to_proto(MINIMAL))
    wire.started_at = None
    with pytest.raises(ProtocolError, match="has no started_at"):
        status_from_proto(_wire(wire))


ALL_LIMITS = Limits(memory_bytes=1 << 20, cpu_millis=10, pids=1, io_read_bps=2, io_write_bps=3)


@pytest.mark.parametrize(
    "limits",
    [Limits(), ALL_LIMITS, Limits(pids=5), Limits(memory_bytes=(1 << 64) - 1)],
    ids=["none", "all", "one", "max-uint64"],
)
def test_limits_round_trip_through_bytes(limits: Limits) -> None:
    wire = pb.Limits.parse(bytes(limits_to_proto(limits)))
    assert limits_from_proto(wire) == limits


def test_unset_limits_are_absent_on_the_wire_not_zero() -> None:
    assert bytes(limits_to_proto(Limits())) == b""
    wire = pb.Limits.parse(bytes(limits_to_proto(Limits(pids=5))))
    assert wire.pids == 5
    assert wire.memory_bytes is None
    assert wire.cpu_millis is None


@pytest.mark.parametrize("name", sorted(Limits().__dataclass_fields__))
def test_a_zero_limit_stays_zero_so_validation_can_refuse_it(name: str) -> None:
    """0 is not a valid limit, but it must arrive as 0 (and be refused), never as "no limit"."""
    limits = Limits(**{name: 0})
    wire = pb.Limits.parse(bytes(limits_to_proto(limits)))
    assert bytes(wire) != b""
    back = limits_from_proto(wire)
    assert getattr(back, name) == 0
    assert back.items() == {name: 0}
    with pytest.raises(JobworkerError, match=name):
        back.validate()


def test_absent_limits_message_means_no_limits() -> None:
    assert limits_from_proto(None) == Limits()
    request = pb.StartJobRequest.parse(bytes(pb.StartJobRequest(program="ls")))
    assert request.limits is None
    assert spec_from_proto(request, owner="carol") == JobSpec(program="ls", owner="carol")


@pytest.mark.parametrize("network", [None, Network.HOST, Network.NONE])
def test_placement_round_trips_through_a_start_request(network: Network | None) -> None:
    spec = JobSpec(program="env", env={"A": "1", "B": ""}, cwd="/tmp", user="root", network=network)
    request = pb.StartJobRequest.parse(bytes(spec_to_proto(spec)))
    assert spec_from_proto(request, owner="") == spec
    unset = pb.StartJobRequest.parse(bytes(pb.StartJobRequest(program="env")))
    assert spec_from_proto(unset, owner="") == JobSpec(program="env")


def test_an_unknown_network_is_the_callers_error() -> None:
    request = pb.StartJobRequest(program="env", network=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown network 7"):
        spec_from_proto(pb.StartJobRequest.parse(bytes(request)), owner="")


def test_spec_round_trips_through_a_start_request() -> None:
    spec = JobSpec(
        program="/bin/sh",
        args=("-c", "echo hi"),
        limits=ALL_LIMITS,
        owner="dave",
        max_output=64 << 20,
    )
    request = pb.StartJobRequest.parse(bytes(spec_to_proto(spec)))
    assert request.program == "/bin/sh"
    assert request.args == ["-c", "echo hi"]
    assert spec_from_proto(request, owner="dave") == spec
    # The owner never travels: the server takes it from the caller's certificate.
    assert spec_from_proto(request, owner="eve").owner == "eve"


@pytest.mark.parametrize(
    "chunk",
    [
        OutputChunk(offset=0, data=b"hello\n"),
        OutputChunk(offset=(1 << 64) - 1, data=bytes(range(256)) * 4),
        OutputChunk(offset=1 << 20, data=b"", dropped=(1 << 63) + 1),
    ],
    ids=["text", "binary", "gap"],
)
def test_chunks_round_trip_through_bytes(chunk: OutputChunk) -> None:
    wire = pb.OutputChunk.parse(bytes(chunk_to_proto(chunk)))
    assert chunk_from_proto(wire) == chunk
