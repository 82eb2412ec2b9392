"""The authorization policy: pure functions of an identity, an RPC and a job's owner.

==================  =======  ======
RPC                 admin    user
==================  =======  ======
``StartJob``        yes      yes
``StopJob``         yes      no
``GetJobStatus``    yes      own jobs
``ListJobs``        yes      own jobs
``StreamJobOutput`` yes      own jobs
==================  =======  ======

Two questions, two functions:

* :func:`authorize` answers "may this identity call this RPC at all?" before any handler
  runs (the server's ``RecvRequest`` hook asks it, through :func:`authorize_path`);
* :func:`can_see` answers "may this identity see this job?" inside the service. A job the
  caller may not see must be reported exactly like a job that does not exist (NOT_FOUND),
  and left out of ``ListJobs``, so that other owners' job ids are never revealed.

Health checks (``/grpc.health.v1.Health/...``) need an identity with a valid role, like
every call, but no particular role. Every other path is denied: a new RPC is refused until
this table names it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from jobworker.auth.identity import Identity
from jobworker.auth.roles import Role
from jobworker.errors import PermissionDenied

__all__ = [
    "HEALTH_SERVICE",
    "WORKER_SERVICE",
    "Rpc",
    "authorize",
    "authorize_path",
    "can_see",
    "split_path",
]

WORKER_SERVICE: Final = "jobworker.v1.Worker"
HEALTH_SERVICE: Final = "grpc.health.v1.Health"


class Rpc(enum.StrEnum):
    """The methods of service ``jobworker.v1.Worker``."""

    START_JOB = "StartJob"
    STOP_JOB = "StopJob"
    GET_JOB_STATUS = "GetJobStatus"
    LIST_JOBS = "ListJobs"
    STREAM_JOB_OUTPUT = "StreamJobOutput"


_ALLOWED: Final[Mapping[Role, frozenset[Rpc]]] = {
    Role.ADMIN: frozenset(Rpc),
    Role.USER: frozenset(Rpc) - {Rpc.STOP_JOB},
}


def authorize(identity: Identity, rpc: str) -> None:
    """Return if ``identity`` may call the Worker method ``rpc``; else raise PermissionDenied.

    ``rpc`` is the bare method name, e.g. ``"StopJob"``. Unknown names are denied.
    """
    try:
        method = Rpc(rpc)
    except ValueError:
        raise PermissionDenied(f"{rpc!r} is not a method this server authorizes") from None
    if method not in _ALLOWED.get(identity.role, frozenset()):
        raise PermissionDenied(f"role {identity.role.value!r} may not call {method.value}")


def split_path(path: str) -> tuple[str, str]:
    """Split a gRPC path ``/package.Service/Method`` into ``(service, method)``.

    A path of any other shape gives ``("", path)``.
    """
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return "", path
    return parts[1], parts[2]


def authorize_path(identity: Identity, path: str) -> None:
    """Authorize a call by its full gRPC path, as the server's hook sees it.

    Worker methods follow :func:`authorize`; health checks are open to every identity;
    every other path raises :class:`PermissionDenied`.
    """
    service, method = split_path(path)
    if service == WORKER_SERVICE:
        authorize(identity, method)
    elif service != HEALTH_SERVICE:
        raise PermissionDenied(f"{path!r} is not a method this server authorizes")


def can_see(identity: Identity, owner: str) -> bool:
    """Whether ``identity`` may see (and act on) a job owned by ``owner``.

    An admin sees every job; anyone else sees only the jobs whose owner is their own name.
    """
    return identity.role is Role.ADMIN or identity.name == owner
