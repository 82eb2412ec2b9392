"""The ``jobworker.v1.Worker`` service: protos in, worker calls, protos out.

Handlers do three things only: turn the request into library models, call the
:class:`~jobworker.worker.Worker` on behalf of the caller the auth hook identified, and turn
the result into a response. Errors become statuses in :mod:`jobworker.server.errors`; each
call ends with one audit line.

Ownership: a job belongs to the identity that started it. A caller that may not see a job
(see :func:`~jobworker.auth.policy.can_see`) is told the job does not exist, exactly as for
an unknown id, so job ids of other owners cannot be probed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import grpclib.const
import grpclib.server
from grpclib.exceptions import GRPCError

from jobworker._proto.jobworker import v1 as pb
from jobworker._proto_convert import spec_from_proto, status_to_proto
from jobworker.auth import (
    Identity,
    Rpc,
    audit,
    authorize,
    can_see,
    current_identity,
    may_run_as_account,
)
from jobworker.auth.roles import Role
from jobworker.errors import (
    DataLoss,
    InvalidArgument,
    InvalidOffset,
    JobNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobworker.server.codec import EncodedChunk
from jobworker.server.errors import to_grpc_error
from jobworker.server.limits import ServerLimits
from jobworker.worker import JobStatus, Worker, parse_job_id

__all__ = ["WorkerService"]

log = logging.getLogger(__name__)

_STREAM_PATH = "/jobworker.v1.Worker/StreamJobOutput"

# The largest file offset the kernel can read at (an off_t), less one chunk: pread() refuses
# a range that ends beyond it.
_MAX_OFF_T = (1 << 63) - 1


@dataclass
class _Call:
    """Who is calling, and which job the call concerns (for the audit line)."""

    identity: Identity
    job_id: str | None


class WorkerService(pb.WorkerBase):
    """Serves one :class:`Worker`. :meth:`close` ends every open call with UNAVAILABLE."""

    def __init__(self, worker: Worker, limits: ServerLimits | None = None) -> None:
        self._worker = worker
        self._limits = limits or ServerLimits()
        self._streams: Counter[Identity] = Counter()
        self._calls: set[anyio.CancelScope] = set()
        self._idle = anyio.Event()
        self._idle.set()
        self._closing = False

    # Lifecycle.

    def close(self) -> None:
        """Refuse new calls and end the open ones (their callers get UNAVAILABLE)."""
        self._closing = True
        for scope in self._calls:
            scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until no call is in progress."""
        await self._idle.wait()

    @contextmanager
    def _call(self, rpc: Rpc, job_id: str | None = None) -> Iterator[_Call]:
        """Run one call: identity, the role's grant, shutdown, error mapping, the audit line."""
        call = _Call(current_identity(), job_id)
        outcome: str | grpclib.const.Status = "ok"
        scope = anyio.CancelScope()
        self._calls.add(scope)
        self._idle = anyio.Event() if len(self._calls) == 1 else self._idle
        try:
            if self._closing:
                scope.cancel()
            with scope:
                authorize(call.identity, rpc)
                yield call
            if scope.cancelled_caught:
                raise Unavailable("the server is shutting down; retry on another server or later")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status here
            error = to_grpc_error(exc)
            outcome = error.status
            raise error from None
        except BaseException:
            outcome = "cancelled"  # the client went away, or the server is closing
            raise
        finally:
            self._calls.discard(scope)
            if not self._calls:
                self._idle.set()
            audit(call.identity, rpc, call.job_id, outcome)

    def _visible(self, identity: Identity, job_id: str) -> JobStatus:
        """The status of a job the caller may see, else JobNotFound (as for an unknown id)."""
        status = self._worker.status(job_id)
        if not can_see(identity, status.owner, status.owner_role):
            raise JobNotFound(f"no job {parse_job_id(job_id)}")
        return status

    # Handlers.

    async def start_job(self, message: pb.StartJobRequest) -> pb.StartJobResponse:
        with self._call(Rpc.START_JOB) as call:
            spec = spec_from_proto(
                message, owner=call.identity.name, owner_role=call.identity.role.value
            )
            if spec.user is not None and not may_run_as_account(call.identity):
                raise PermissionDenied(
                    f"role {call.identity.role.value!r} may not choose the account a job runs as"
                )
            self._check_jobs_quota(call.identity)
            status = await self._worker.start(spec)
            call.job_id = status.id
        return pb.StartJobResponse(status=status_to_proto(status))

    async def stop_job(self, message: pb.StopJobRequest) -> pb.StopJobResponse:
        with self._call(Rpc.STOP_JOB, message.job_id) as call:
            self._visible(call.identity, message.job_id)
            status = await self._worker.stop(message.job_id, by=call.identity.name)
        return pb.StopJobResponse(status=status_to_proto(status))

    async def get_job_status(self, message: pb.GetJobStatusRequest) -> pb.GetJobStatusResponse:
        with self._call(Rpc.GET_JOB_STATUS, message.job_id) as call:
            status = self._visible(call.identity, message.job_id)
        return pb.GetJobStatusResponse(status=status_to_proto(status))

    async def list_jobs(self, message: pb.ListJobsRequest) -> pb.ListJobsResponse:
        with self._call(Rpc.LIST_JOBS) as call:
            jobs = [s for s in self._worker.list() if can_see(call.identity, s.owner, s.owner_role)]
        return pb.ListJobsResponse(jobs=[status_to_proto(s) for s in jobs])

    async def stream_job_output(
        self, message: pb.StreamJobOutputRequest
    ) -> AsyncIterator[pb.OutputChunk]:  # pragma: no cover - replaced in __mapping__
        raise GRPCError(grpclib.const.Status.UNIMPLEMENTED)
        yield pb.OutputChunk()

    async def _stream_job_output(
        self, stream: grpclib.server.Stream[pb.StreamJobOutputRequest, pb.OutputChunk]
    ) -> None:
        """Server streaming, with the grpclib stream in hand.

        The generated base class would drive an async generator, and a shutdown could then
        cancel the call while it is suspended outside this code; writing to the stream here
        keeps each call's cancel scope around all of its work.
        """
        request = await stream.recv_message()
        assert request is not None
        with (
            self._call(Rpc.STREAM_JOB_OUTPUT, request.job_id) as call,
            self._stream_slot(call.identity),
        ):
            self._visible(call.identity, request.job_id)
            if request.offset > _MAX_OFF_T - self._worker.config.chunk_size:
                raise InvalidOffset(
                    f"offset {request.offset} is beyond the largest output a job can have"
                )
            try:
                async with self._worker.output(
                    request.job_id, request.offset, timestamps=request.timestamps
                ) as output:
                    async for chunk in output:
                        # Encoded here, sent as an OutputChunk by the server's codec.
                        await stream.send_message(cast(pb.OutputChunk, EncodedChunk(chunk)))
            except FileNotFoundError:  # opening the log: nothing else here touches a path
                raise DataLoss(
                    f"the output of job {parse_job_id(request.job_id)} is no longer on the "
                    "server (its log file was removed)"
                ) from None

    async def remove_job(self, message: pb.RemoveJobRequest) -> pb.RemoveJobResponse:
        with self._call(Rpc.REMOVE_JOB, message.job_id) as call:
            self._visible(call.identity, message.job_id)
            status = self._worker.remove(message.job_id)
        return pb.RemoveJobResponse(status=status_to_proto(status))

    async def prune_jobs(self, message: pb.PruneJobsRequest) -> pb.PruneJobsResponse:
        with self._call(Rpc.PRUNE_JOBS) as call:
            older_than = message.older_than_seconds
            if older_than is not None and not 0 <= older_than < float("inf"):
                raise InvalidArgument(f"older_than_seconds must be 0 or more, not {older_than}")
            identity = call.identity
            removed = self._worker.prune(
                older_than, owned=lambda s: can_see(identity, s.owner, s.owner_role)
            )
        return pb.PruneJobsResponse(job_ids=removed)

    # Per-user quotas (admins are not counted).

    def _check_jobs_quota(self, identity: Identity) -> None:
        top = self._limits.max_running_jobs_per_user
        if (
            identity.role is Role.USER
            and self._worker.running_count(identity.name, identity.role.value) >= top
        ):
            raise ResourceExhausted(
                f"{identity.name!r} has {top} jobs running, the most a user may; "
                "start more when some have ended"
            )

    @contextmanager
    def _stream_slot(self, identity: Identity) -> Iterator[None]:
        if identity.role is not Role.USER:
            yield
            return
        if self._streams[identity] >= self._limits.max_streams_per_user:
            raise ResourceExhausted(
                f"{identity.name!r} has {self._limits.max_streams_per_user} output streams "
                "open, the most a user may"
            )
        self._streams[identity] += 1
        try:
            yield
        finally:
            self._streams[identity] -= 1
            if not self._streams[identity]:
                del self._streams[identity]

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping: dict[str, Any] = super().__mapping__()
        generated = mapping[_STREAM_PATH]
        mapping[_STREAM_PATH] = grpclib.const.Handler(
            self._stream_job_output,
            generated.cardinality,
            generated.request_type,
            generated.reply_type,
        )
        return mapping
