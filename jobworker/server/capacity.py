"""How many jobs this host lets one server run at once, and what bounds it.

Every running job costs the server a few host resources, and each follower of its output one
or two more. The numbers below are what the code holds (see docs/performance.md, "What bounds
the number of jobs"):

* open files of the server process: the job's pidfd (a follower holds the log open only while
  it reads: one that waits for output holds none);
* inotify watches (``fs.inotify.max_user_watches``, counted for the user across all its
  processes): the job's log (its time record's watch, which its followers share), and its
  ``cgroup.events`` while its end is recorded;
* process ids (``kernel.pid_max``, host-wide): the job's monitor, its init and its program;
* tasks of the server's own cgroup (``pids.max``, systemd's ``TasksMax``): the monitor.

:func:`check` reads the limits when the server starts and logs how many jobs, each with one
follower, fit; below :data:`EXPECTED_JOBS` it warns and names what to raise.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["EXPECTED_JOBS", "Bound", "bounds", "check"]

log = logging.getLogger(__name__)

# The number of concurrent jobs (each with one follower) a server is built and tested for.
EXPECTED_JOBS: Final = 10_000
# Descriptors, watches and pids the server needs for itself: listening socket, connections,
# the store, its own inotify and cgroup files, and the host's other processes.
_FDS_RESERVED: Final = 256
_PIDS_RESERVED: Final = 1024


@dataclass(frozen=True)
class Bound:
    """One limit on concurrent jobs: its name, value, cost per job, and how to raise it."""

    name: str
    limit: int
    per_job: int
    reserved: int
    raise_with: str

    @property
    def jobs(self) -> int:
        return max(self.limit - self.reserved, 0) // self.per_job


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


_CGROUP_FS: Final = Path("/sys/fs/cgroup")


def _own_pids_max(
    proc_cgroup: Path = Path("/proc/self/cgroup"), mounts: Path = _CGROUP_FS
) -> int | None:
    """The smallest ``pids.max`` of this process's cgroup and its ancestors, if any is set:
    in the unified hierarchy (at ``mounts`` or, on hybrid hosts, ``mounts/unified``) and in a
    cgroup v1 ``pids`` hierarchy (``mounts/pids``)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if not path.startswith("/"):
            continue
        if controllers == "":  # cgroup v2 (the unified hierarchy)
            candidates += [mounts / relative, mounts / "unified" / relative]
        elif "pids" in controllers.split(","):
            candidates.append(mounts / "pids" / relative)
    limits = []
    for start in candidates:
        for directory in (start, *start.parents):
            if directory != mounts and mounts not in directory.parents:
                break
            if (value := _read_int(directory / "pids.max")) is not None:
                limits.append(value)
    return min(limits) if limits else None


def bounds() -> list[Bound]:
    """The host's limits on concurrent jobs that this process can read."""
    found: list[Bound] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        found.append(
            Bound("open files", soft, 1, _FDS_RESERVED, "LimitNOFILE= (systemd) or ulimit -n")
        )
    watches = _read_int(Path("/proc/sys/fs/inotify/max_user_watches"))
    if watches is not None:
        found.append(Bound("inotify watches", watches, 2, 0, "sysctl fs.inotify.max_user_watches"))
    pid_max = _read_int(Path("/proc/sys/kernel/pid_max"))
    if pid_max is not None:
        found.append(Bound("process ids", pid_max, 3, _PIDS_RESERVED, "sysctl kernel.pid_max"))
    tasks = _own_pids_max()
    if tasks is not None:
        found.append(
            Bound("tasks of the server's cgroup", tasks, 1, 64, "TasksMax= (systemd) or pids.max")
        )
    return found


def check(found: list[Bound] | None = None) -> int | None:
    """Log how many jobs, each with one follower, this host allows; warn below
    :data:`EXPECTED_JOBS`, naming what to raise. Returns that number (None: unbounded)."""
    found = bounds() if found is None else found
    if not found:
        return None
    tightest = min(found, key=lambda bound: bound.jobs)
    log.info(
        "this host allows about %d concurrent jobs, each with one follower (%s)",
        tightest.jobs,
        ", ".join(f"{b.name} {b.limit}" for b in found),
    )
    for bound in sorted(found, key=lambda b: b.jobs):
        if bound.jobs < EXPECTED_JOBS:
            log.warning(
                "%s (%d) allow only about %d concurrent jobs; for %d, raise it to %d or more "
                "with %s",
                bound.name,
                bound.limit,
                bound.jobs,
                EXPECTED_JOBS,
                EXPECTED_JOBS * bound.per_job + bound.reserved,
                bound.raise_with,
            )
    return tightest.jobs
