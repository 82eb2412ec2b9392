"""The one place where exceptions become gRPC statuses.

A :class:`~jobworker.errors.JobworkerError` travels with the status its class names and its
message, which is written for the caller. Anything else is a fault of the server: it is
logged here with its traceback and reaches the caller only as ``INTERNAL`` with a generic
message, so no internals (paths, other jobs, stack traces) leak.
"""

from __future__ import annotations

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from jobworker.errors import JobworkerError

__all__ = ["to_grpc_error"]

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the jobworker server; see its log"


def to_grpc_error(exc: Exception) -> GRPCError:
    """The :class:`GRPCError` that tells the caller about ``exc``."""
    if isinstance(exc, GRPCError):
        return exc
    if isinstance(exc, JobworkerError) and exc.grpc_status is not Status.INTERNAL:
        return GRPCError(exc.grpc_status, exc.message)
    log.error("internal error while serving a call", exc_info=exc)
    return GRPCError(Status.INTERNAL, INTERNAL_MESSAGE)
