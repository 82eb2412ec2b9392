"""The authorization policy: pure functions of an identity, an RPC and a job's owner.

The one table of what each role gets (:data:`GRANTS`), an allow-list: a role may do only
what its row names, so a new RPC is refused to every role until it is added here.

===========================  ==========  ==========
                             ``admin``   ``user``
===========================  ==========  ==========
``StartJob``                 yes         yes
``StopJob``                  yes         no
``GetJobStatus``             yes         yes
``ListJobs``                 yes         yes
``StreamJobOutput``          yes         yes
``RemoveJob``                yes         yes
``PruneJobs``                yes         yes
sees (status, list, stream,  all jobs    own jobs
remove, prune)
``StartJob`` with ``user``   yes         no
===========================  ==========  ==========

``StartJob`` with ``user`` runs the job as a named host account (root included) instead of
an unprivileged uid of the server's own, and only accounts the server allows
(``serve --allow-user``).

Three questions, three functions:

* :func:`authorize` answers "may this identity call this RPC at all?"; the service asks it
  once the request is read, so that the audit line of a refusal names the job it targeted;
* :func:`can_see` answers "may this identity see this job?" inside the service. A job the
  caller may not see must be reported exactly like a job that does not exist (NOT_FOUND),
  and left out of ``ListJobs``, so that other owners' job ids are never revealed;
* :func:`may_run_as_account` answers "may this identity choose the job's host account?".

Health checks (``/grpc.health.v1.Health/...``) need an identity with a valid role, like
every call, but no particular role. Every other path is denied before any handler runs
(:func:`check_path`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from jobworker.auth.identity import Identity
from jobworker.auth.roles import Role
from jobworker.errors import PermissionDenied

__all__ = [
    "GRANTS",
    "HEALTH_SERVICE",
    "WORKER_SERVICE",
    "Grant",
    "Rpc",
    "Scope",
    "authorize",
    "authorize_path",
    "can_see",
    "check_path",
    "may_run_as_account",
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
    REMOVE_JOB = "RemoveJob"
    PRUNE_JOBS = "PruneJobs"


class Scope(enum.Enum):
    """Which jobs a role sees."""

    OWN = "own jobs"
    ALL = "all jobs"


@dataclass(frozen=True)
class Grant:
    """What one role may do: its RPCs, the jobs it sees, and whether it picks accounts."""

    rpcs: frozenset[Rpc]
    sees: Scope
    run_as_account: bool


GRANTS: Final[Mapping[Role, Grant]] = {
    Role.ADMIN: Grant(
        rpcs=frozenset(
            {
                Rpc.START_JOB,
                Rpc.STOP_JOB,
                Rpc.GET_JOB_STATUS,
                Rpc.LIST_JOBS,
                Rpc.STREAM_JOB_OUTPUT,
                Rpc.REMOVE_JOB,
                Rpc.PRUNE_JOBS,
            }
        ),
        sees=Scope.ALL,
        run_as_account=True,
    ),
    Role.USER: Grant(
        rpcs=frozenset(
            {
                Rpc.START_JOB,
                Rpc.GET_JOB_STATUS,
                Rpc.LIST_JOBS,
                Rpc.STREAM_JOB_OUTPUT,
                Rpc.REMOVE_JOB,
                Rpc.PRUNE_JOBS,
            }
        ),
        sees=Scope.OWN,
        run_as_account=False,
    ),
}
_NOTHING: Final = Grant(rpcs=frozenset(), sees=Scope.OWN, run_as_account=False)


def authorize(identity: Identity, rpc: str) -> None:
    """Return if ``identity`` may call the Worker method ``rpc``; else raise PermissionDenied.

    ``rpc`` is the bare method name, e.g. ``"StopJob"``. Unknown names are denied.
    """
    try:
        method = Rpc(rpc)
    except ValueError:
        raise PermissionDenied(f"{rpc!r} is not a method this server authorizes") from None
    if method not in GRANTS.get(identity.role, _NOTHING).rpcs:
        raise PermissionDenied(f"role {identity.role.value!r} may not call {method.value}")


def split_path(path: str) -> tuple[str, str]:
    """Split a gRPC path ``/package.Service/Method`` into ``(service, method)``.

    A path of any other shape gives ``("", path)``.
    """
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return "", path
    return parts[1], parts[2]


def check_path(path: str) -> None:
    """Raise :class:`PermissionDenied` unless ``path`` is a method this server authorizes.

    Whether the caller's role allows it is :func:`authorize`'s question, asked later.
    """
    service, method = split_path(path)
    if service == WORKER_SERVICE and method in set(Rpc):
        return
    if service != HEALTH_SERVICE:
        raise PermissionDenied(f"{path!r} is not a method this server authorizes")


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


def can_see(identity: Identity, owner: str, owner_role: str) -> bool:
    """Whether ``identity`` may see (and act on) a job owned by ``owner``.

    An admin sees every job; anyone else sees only the jobs whose owner is their own name
    *and* role, so a user whose certificate says ``admin`` sees nothing of the admin's.
    """
    if GRANTS.get(identity.role, _NOTHING).sees is Scope.ALL:
        return True
    return identity.name == owner and identity.role.value == owner_role


def may_run_as_account(identity: Identity) -> bool:
    """Whether ``identity`` may have a job run as a named host account (root included)."""
    return GRANTS.get(identity.role, _NOTHING).run_as_account
