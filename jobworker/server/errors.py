"""The one place where exceptions become gRPC statuses.

A :class:`~jobworker.errors.JobworkerError` travels with the status its class names and its
message, which is written for the caller, and with its class's name in the status details: a
``google.rpc.ErrorInfo`` (domain ``jobworker``, reason the class name) in the standard
``grpc-status-details-bin`` trailer, which any gRPC client can read and from which the
jobworker client raises the same class again. Two kinds of host errors are told apart first
(:func:`refine`), because their status tells the caller what to do:

* the kernel refused a job's command line as too long (``E2BIG``): INVALID_ARGUMENT, since
  retrying the same request can never work;
* the server ran out of a resource (descriptors, memory, disk space): RESOURCE_EXHAUSTED,
  naming what ran out.

Anything else is a fault of the server: it is logged here with its traceback and reaches
the caller only as ``INTERNAL`` with a generic message, so no internals (paths, other jobs,
stack traces) leak.
"""

from __future__ import annotations

import errno
import logging
from typing import Final

from google.rpc.error_details_pb2 import ErrorInfo  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from jobworker.errors import ERROR_DOMAIN, InvalidArgument, JobworkerError, ResourceExhausted

__all__ = ["refine", "to_grpc_error"]

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the jobworker server; see its log"

#: Host resources whose exhaustion a caller may wait out, by errno.
_EXHAUSTED: Final = {
    errno.EMFILE: "open files (this process)",
    errno.ENFILE: "open files (the whole host)",
    errno.ENOMEM: "memory",
    errno.ENOSPC: "disk space",
    errno.EDQUOT: "disk quota",
    errno.ENOBUFS: "network buffers",
}


def _os_error(exc: BaseException) -> OSError | None:
    """``exc`` itself, or the OSError it was raised from, if either is one."""
    if isinstance(exc, OSError):
        return exc
    return exc.__cause__ if isinstance(exc.__cause__, OSError) else None


def refine(exc: Exception) -> Exception:
    """The error the caller should see for ``exc``: host errors named by their errno."""
    os_error = _os_error(exc)
    if os_error is None or isinstance(exc, InvalidArgument):
        return exc
    if os_error.errno == errno.E2BIG:
        return InvalidArgument(
            "the program's arguments and environment are larger than this host accepts "
            "(E2BIG); shorten them"
        )
    if (what := _EXHAUSTED.get(os_error.errno or 0)) is not None:
        log.warning("refused a call: out of %s (%s)", what, os_error)
        return ResourceExhausted(f"the server is out of {what}; retry later")
    return exc


def to_grpc_error(exc: Exception) -> GRPCError:
    """The :class:`GRPCError` that tells the caller about ``exc``."""
    if isinstance(exc, GRPCError):
        return exc
    exc = refine(exc)
    if isinstance(exc, JobworkerError) and exc.grpc_status is not Status.INTERNAL:
        return GRPCError(exc.grpc_status, exc.message, _details(exc))
    log.error("internal error while serving a call", exc_info=exc)
    return GRPCError(Status.INTERNAL, INTERNAL_MESSAGE)


def _details(exc: JobworkerError) -> list[ErrorInfo] | None:
    """The status details that name the class of ``exc``, if it is one of the error tree.

    grpclib sends them in ``grpc-status-details-bin`` (its server uses the google.rpc codec
    whenever googleapis-common-protos is installed, and jobworker depends on it).
    """
    cls = type(exc)
    if cls.__module__ != "jobworker.errors":
        return None
    return [ErrorInfo(reason=cls.__name__, domain=ERROR_DOMAIN)]
