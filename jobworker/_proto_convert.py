"""The one mapping between the wire messages (``jobworker.v1``) and the library's models.

The server turns requests into models and models into responses; the client library does
the reverse. Both use these functions and nothing else touches a generated message field,
so the two ends cannot drift apart. The module sits at the package top level, beside the
generated code, because the server and the client both need it and neither may import the
other.

Round trips are exact:

* ``None`` and ``0`` stay apart: every optional model field is a proto3 ``optional`` field,
  so an unset limit, exit code, signal or usage figure is absent on the wire, not zero.
* Times are timezone-aware UTC datetimes at both ends (microsecond precision, which is all a
  :class:`~datetime.datetime` holds); a naive datetime is refused rather than guessed at.
* ``unenforced`` travels as a sorted list of limit names and comes back as a frozenset.

What arrives from the other end is not trusted to be well formed: a status with an
unspecified or unknown state, or without a start time, raises :class:`ProtocolError`
instead of producing a half-valid model. Values are *not* range-checked here; that is the
job of :meth:`JobSpec.validate <jobworker.models.JobSpec.validate>`.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Final

from jobworker._proto.jobworker import v1 as pb
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

__all__ = [
    "ProtocolError",
    "chunk_from_proto",
    "chunk_to_proto",
    "limits_from_proto",
    "limits_to_proto",
    "network_from_proto",
    "network_to_proto",
    "spec_from_proto",
    "spec_to_proto",
    "state_from_proto",
    "state_to_proto",
    "status_from_proto",
    "status_to_proto",
    "usage_from_proto",
    "usage_to_proto",
]


class ProtocolError(JobworkerError):
    """A message from the other end that this version cannot make sense of.

    For example a job state this version does not know (a newer peer) or a required field
    that is missing. It travels as INTERNAL, like any other fault that is not the caller's.
    """


_STATE_TO_PROTO: Final[dict[JobState, pb.JobState]] = {
    JobState.RUNNING: pb.JobState.RUNNING,
    JobState.COMPLETED: pb.JobState.COMPLETED,
    JobState.STOPPED: pb.JobState.STOPPED,
    JobState.TERMINATED: pb.JobState.TERMINATED,
    JobState.LOST: pb.JobState.LOST,
}
_STATE_FROM_PROTO: Final[dict[int, JobState]] = {
    int(wire): model for model, wire in _STATE_TO_PROTO.items()
}


def state_to_proto(state: JobState) -> pb.JobState:
    """The wire value of a job state (never ``JOB_STATE_UNSPECIFIED``)."""
    return _STATE_TO_PROTO[state]


def state_from_proto(state: pb.JobState | int) -> JobState:
    """The job state for a wire value; :class:`ProtocolError` for an unspecified or unknown one.

    betterproto2 does not reject enum values it does not know: it parses them into
    pseudo-members (shown as ``JobState.~UNKNOWN``), so the check has to be made here.
    """
    value = int(state)
    model = _STATE_FROM_PROTO.get(value)
    if model is None:
        names = pb.JobState.betterproto_value_to_renamed_proto_names()
        known = ", ".join(f"{names[v]} ({v})" for v in sorted(_STATE_FROM_PROTO))
        shown = f"{names[value]} ({value})" if value in names else f"unknown value {value}"
        raise ProtocolError(f"job state {shown} is not a valid job state: expected {known}")
    return model


_NETWORK_TO_PROTO: Final[dict[Network, pb.JobNetwork]] = {
    Network.HOST: pb.JobNetwork.HOST,
    Network.NONE: pb.JobNetwork.NONE,
}
_NETWORK_FROM_PROTO: Final[dict[int, Network]] = {
    int(wire): model for model, wire in _NETWORK_TO_PROTO.items()
}


def network_to_proto(network: Network | None) -> pb.JobNetwork:
    """The wire value of a network; ``None`` (the server's choice) is ``UNSPECIFIED``."""
    return pb.JobNetwork.UNSPECIFIED if network is None else _NETWORK_TO_PROTO[network]


def network_from_proto(network: pb.JobNetwork | int) -> Network | None:
    """The network for a wire value: ``None`` for ``UNSPECIFIED``.

    An unknown value is refused with :class:`InvalidArgument`: it is the caller's to fix.
    """
    value = int(network)
    if value == int(pb.JobNetwork.UNSPECIFIED):
        return None
    model = _NETWORK_FROM_PROTO.get(value)
    if model is None:
        raise InvalidArgument(f"unknown network {value}: expected host (1) or none (2)")
    return model


def limits_to_proto(limits: Limits) -> pb.Limits:
    """The wire form of ``limits``; a ``None`` limit is left unset, not sent as zero."""
    return pb.Limits(
        memory_bytes=limits.memory_bytes,
        cpu_millis=limits.cpu_millis,
        pids=limits.pids,
        io_read_bps=limits.io_read_bps,
        io_write_bps=limits.io_write_bps,
    )


def limits_from_proto(limits: pb.Limits | None) -> Limits:
    """The limits a message carries; an absent message or field is ``None`` (no limit).

    A field that is present keeps its value, zero included, so that validation can refuse
    it rather than have it silently mean "no limit".
    """
    if limits is None:
        return Limits()
    return Limits(
        memory_bytes=limits.memory_bytes,
        cpu_millis=limits.cpu_millis,
        pids=limits.pids,
        io_read_bps=limits.io_read_bps,
        io_write_bps=limits.io_write_bps,
    )


def usage_to_proto(usage: Usage) -> pb.Usage:
    """The wire form of ``usage``; a figure the host did not report is left unset."""
    return pb.Usage(**{f.name: getattr(usage, f.name) for f in fields(Usage)})


def usage_from_proto(usage: pb.Usage | None) -> Usage:
    """The usage a message carries; an absent message or field is ``None`` (not reported)."""
    if usage is None:
        return Usage()
    return Usage(**{f.name: getattr(usage, f.name) for f in fields(Usage)})


def spec_to_proto(spec: JobSpec) -> pb.StartJobRequest:
    """The request that starts ``spec``. The owner is not sent: the server takes it from the
    caller's certificate."""
    return pb.StartJobRequest(
        program=spec.program,
        args=list(spec.args),
        limits=limits_to_proto(spec.limits),
        env=dict(spec.env),
        cwd=spec.cwd,
        user=spec.user,
        network=network_to_proto(spec.network),
        max_output=spec.max_output,
    )


def spec_from_proto(request: pb.StartJobRequest, owner: str, owner_role: str = "") -> JobSpec:
    """The job spec a start request asks for, on behalf of ``owner``. Not validated here."""
    return JobSpec(
        program=request.program,
        args=tuple(request.args),
        limits=limits_from_proto(request.limits),
        owner=owner,
        owner_role=owner_role,
        env=dict(request.env),
        cwd=request.cwd,
        user=request.user,
        network=network_from_proto(request.network),
        max_output=request.max_output,
    )


def _aware(name: str, value: datetime) -> datetime:
    # betterproto2 converts an aware datetime to UTC itself when it serializes the message;
    # a naive one would only fail then, far from here, so it is refused now.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, not {value!r}")
    return value


def status_to_proto(status: JobStatus) -> pb.JobStatus:
    """The wire form of a job's status.

    Raises :class:`ValueError` for a naive ``started_at`` or ``ended_at``: the worker always
    records aware UTC times, so a naive one is a bug that must not reach a client.
    """
    return pb.JobStatus(
        id=status.id,
        state=state_to_proto(status.state),
        owner=status.owner,
        program=status.program,
        args=list(status.args),
        pid=status.pid,
        exit_code=status.exit_code,
        signal=status.signal,
        oom_killed=status.oom_killed,
        started_at=_aware("started_at", status.started_at),
        ended_at=None if status.ended_at is None else _aware("ended_at", status.ended_at),
        limits=limits_to_proto(status.limits),
        unenforced_limits=sorted(status.unenforced),
        usage=usage_to_proto(status.usage),
        env=dict(status.env),
        cwd=status.cwd,
        user=status.user,
        uid=status.uid,
        network=network_to_proto(status.network),
        stopped_by=status.stopped_by,
        max_output=status.max_output,
        output_bytes=status.output_bytes,
        output_dropped=status.output_dropped,
        output_lost=status.output_lost,
        owner_role=status.owner_role,
    )


def status_from_proto(status: pb.JobStatus) -> JobStatus:
    """The job status a message carries; :class:`ProtocolError` if it is not a valid one.

    Times come back as timezone-aware UTC datetimes (betterproto2 builds them that way).
    """
    state = state_from_proto(status.state)
    if status.started_at is None:
        raise ProtocolError(f"status of job {status.id!r} has no started_at")
    return JobStatus(
        id=status.id,
        state=state,
        owner=status.owner,
        program=status.program,
        args=tuple(status.args),
        pid=status.pid,
        started_at=status.started_at,
        ended_at=status.ended_at,
        exit_code=status.exit_code,
        signal=status.signal,
        oom_killed=status.oom_killed,
        limits=limits_from_proto(status.limits),
        unenforced=frozenset(status.unenforced_limits),
        usage=usage_from_proto(status.usage),
        env=dict(status.env),
        cwd=status.cwd,
        user=status.user,
        uid=status.uid,
        network=network_from_proto(status.network) or Network.HOST,
        stopped_by=status.stopped_by,
        max_output=status.max_output,
        output_bytes=status.output_bytes,
        output_dropped=status.output_dropped,
        output_lost=status.output_lost,
        owner_role=status.owner_role,
    )


def chunk_to_proto(chunk: OutputChunk) -> pb.OutputChunk:
    """The wire form of a piece of output, or of a gap in it."""
    written_at = None if chunk.written_at is None else _aware("written_at", chunk.written_at)
    return pb.OutputChunk(
        offset=chunk.offset, data=chunk.data, dropped=chunk.dropped, written_at=written_at
    )


def chunk_from_proto(chunk: pb.OutputChunk) -> OutputChunk:
    """The piece of output (or the gap) a message carries."""
    return OutputChunk(
        offset=chunk.offset, data=chunk.data, dropped=chunk.dropped, written_at=chunk.written_at
    )
