"""The one exception tree of jobworker.

Every error that a caller can see is a :class:`JobworkerError`. Each class knows the gRPC
status it travels as; the server maps errors to statuses in one place
(``jobworker.server.errors``) and the client maps them back (:func:`error_from_status`, used
by ``jobworker.client``). The class itself travels too, by name, in the status details (a
``google.rpc.ErrorInfo`` with domain :data:`ERROR_DOMAIN`), so a client raises exactly the
class the server raised; an unknown name falls back to the class of the status::

    JobworkerError                      INTERNAL
    +-- InvalidArgument                 INVALID_ARGUMENT
    |   +-- InvalidJobId
    |   +-- InvalidCommand
    |   +-- InvalidLimits
    |   +-- InvalidOffset
    |   +-- InvalidMessage
    +-- NotFound                        NOT_FOUND
    |   +-- JobNotFound
    +-- FailedPrecondition              FAILED_PRECONDITION
    |   +-- LimitNotEnforceable
    +-- PermissionDenied                PERMISSION_DENIED
    +-- Unauthenticated                 UNAUTHENTICATED
    +-- ResourceExhausted               RESOURCE_EXHAUSTED
    +-- Unavailable                     UNAVAILABLE
    |   +-- WorkerClosed
    |   +-- TlsError                    (client side: the handshake failed)
    +-- DeadlineExceeded                DEADLINE_EXCEEDED (the client's own deadline)
    +-- DataLoss                        DATA_LOSS
    +-- CgroupError                     INTERNAL
    +-- ConfigError                     (start-up only, never sent)
        +-- CredentialsError            (a client's certificate, key or CA file)

Messages are written for the person who made the request: they say what was wrong and what
is accepted, and never carry server internals such as file paths of other jobs.
"""

from __future__ import annotations

from typing import ClassVar, Final

from grpclib.const import Status

__all__ = [
    "ERROR_DOMAIN",
    "CgroupError",
    "ConfigError",
    "CredentialsError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidCommand",
    "InvalidJobId",
    "InvalidLimits",
    "InvalidMessage",
    "InvalidOffset",
    "JobNotFound",
    "JobworkerError",
    "LimitNotEnforceable",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TlsError",
    "Unauthenticated",
    "Unavailable",
    "WorkerClosed",
    "error_from_status",
]

#: The ``domain`` of the ``google.rpc.ErrorInfo`` whose ``reason`` names the error's class.
ERROR_DOMAIN: Final = "jobworker"


class JobworkerError(Exception):
    """Base of every error jobworker reports."""

    grpc_status: ClassVar[Status] = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(JobworkerError):
    """The request itself is malformed; nothing was changed."""

    grpc_status = Status.INVALID_ARGUMENT


class InvalidJobId(InvalidArgument):
    """A job id that is not a canonical UUID."""


class InvalidCommand(InvalidArgument):
    """An empty program, NUL bytes, or a program that cannot be executed."""


class InvalidLimits(InvalidArgument):
    """A resource limit outside its accepted range."""


class InvalidOffset(InvalidArgument):
    """An output offset that is negative or past the end of a finished job's output."""


class InvalidMessage(InvalidArgument):
    """A request that is not a well-formed gRPC message of the expected type: a broken
    length prefix, a compressed flag, bytes that are not valid protobuf for the message,
    or no message at all."""


class NotFound(JobworkerError):
    """The named thing does not exist (or is not visible to the caller)."""

    grpc_status = Status.NOT_FOUND


class JobNotFound(NotFound):
    """No job with this id is visible to the caller."""


class FailedPrecondition(JobworkerError):
    """The request is valid, but this host cannot carry it out as asked."""

    grpc_status = Status.FAILED_PRECONDITION


class LimitNotEnforceable(FailedPrecondition):
    """A limit was asked for explicitly but its cgroup controller is not available."""


class PermissionDenied(JobworkerError):
    """The caller's role does not allow this call."""

    grpc_status = Status.PERMISSION_DENIED


class Unauthenticated(JobworkerError):
    """The caller presented no usable identity."""

    grpc_status = Status.UNAUTHENTICATED


class Unavailable(JobworkerError):
    """The service cannot take the call now; it may succeed later or elsewhere."""

    grpc_status = Status.UNAVAILABLE


class WorkerClosed(Unavailable):
    """The worker is shutting down and takes no new work."""


class DeadlineExceeded(JobworkerError):
    """No answer came within the call's deadline. The server was reached, or may have been,
    and may still be carrying the call out (a stop goes on): ask for the job's status."""

    grpc_status = Status.DEADLINE_EXCEEDED


class TlsError(Unavailable):
    """The TLS handshake failed: the server's certificate is not trusted or not for this host
    name, or the server refused the client certificate. Retrying does not help until a
    certificate or a setting changes; the message says which file."""


class ResourceExhausted(JobworkerError):
    """A limit of the server was reached (a message too large, too many connections);
    the message says which one."""

    grpc_status = Status.RESOURCE_EXHAUSTED


class DataLoss(JobworkerError):
    """Data the server had promised to keep is gone (a job's output log was removed)."""

    grpc_status = Status.DATA_LOSS


class CgroupError(JobworkerError):
    """The cgroup hierarchy did not behave as expected (a server-side fault)."""


class ConfigError(JobworkerError):
    """The configuration cannot work on this host; raised at start-up."""


# The most specific class that a status alone identifies, for the client's side.
_BY_STATUS: dict[Status, type[JobworkerError]] = {
    Status.INVALID_ARGUMENT: InvalidArgument,
    Status.NOT_FOUND: JobNotFound,
    Status.FAILED_PRECONDITION: FailedPrecondition,
    Status.PERMISSION_DENIED: PermissionDenied,
    Status.UNAUTHENTICATED: Unauthenticated,
    Status.UNAVAILABLE: Unavailable,
    Status.RESOURCE_EXHAUSTED: ResourceExhausted,
    Status.DATA_LOSS: DataLoss,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _by_name() -> dict[str, type[JobworkerError]]:
    found: dict[str, type[JobworkerError]] = {}
    pending: list[type[JobworkerError]] = [JobworkerError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == __name__:  # only the classes of this module
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_class(status: Status, name: str | None) -> type[JobworkerError]:
    """The class to raise for ``status`` whose details named class ``name``.

    Only a class of this module that travels with ``status`` is ever chosen; any other name
    (a newer server's class, a hostile server) gives the class of the status alone.
    """
    cls = _by_name().get(name or "")
    if cls is not None and cls.grpc_status is status and status is not Status.INTERNAL:
        return cls
    return _BY_STATUS.get(status, JobworkerError)


def error_from_status(
    status: Status, message: str | None, class_name: str | None = None
) -> JobworkerError:
    """The error a client raises for a gRPC status the server sent (see :func:`error_class`)."""
    cls = error_class(status, class_name)
    text = message or status.name.lower().replace("_", " ")
    if cls is JobworkerError:
        text = f"{status.name}: {text}"
    return cls(text)


class CredentialsError(ConfigError):
    """A client certificate, key or CA file that is missing or unusable; the message names
    the file, and ``setting`` says which one it is (``cert``, ``key`` or ``ca``)."""

    def __init__(self, message: str, setting: str = "") -> None:
        super().__init__(message)
        self.setting = setting
