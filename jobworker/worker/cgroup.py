"""cgroup v2: finding the hierarchy, using a delegated subtree, and one cgroup per job.

Layout under the subtree delegated to the worker (``ROOT``)::

    ROOT/                 cgroup.subtree_control: +memory +cpu +io +pids (what ROOT offers)
      server/             the worker's own process, when it started inside ROOT itself
      jobs/               no processes; passes the controllers on
        <job id>/         one job: its limits and every process it starts

The worker writes only inside ROOT. When its own cgroup is ROOT it moves itself (and only
itself) into ``server/``: cgroup v2 lets a cgroup hand controllers to its children only when it
holds no processes itself. When the worker runs in the hierarchy's real root (no delegation),
ROOT is ``<mount>/jobworker`` and the controllers are whatever the root already passes down.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jobworker.errors import CgroupError, ConfigError
from jobworker.models import Limits, Usage
from jobworker.worker.process import HELPER_PROCESSES

__all__ = [
    "CONTROLLERS",
    "CgroupTree",
    "JobCgroup",
    "block_device_of",
    "find_cgroup2_mount",
    "own_cgroup",
]

log = logging.getLogger(__name__)

# The controllers jobworker uses, in the order it enables them.
CONTROLLERS: Final = ("memory", "cpu", "io", "pids")
CPU_PERIOD_USEC: Final = 100_000


def find_cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """The mount point of the cgroup2 filesystem, from ``/proc/self/mountinfo``."""
    for line in mountinfo.read_text().splitlines():
        # "36 35 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            return Path(_unescape_mount_path(left.split(" ")[4]))
    raise ConfigError("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")


def _unescape_mount_path(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as three octal digits (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def own_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup v2 path (``/`` for the root), from ``/proc/self/cgroup``."""
    for line in proc_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].split(" ", 1)[0] or "/"
    raise ConfigError(
        "this process is not in a cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)"
    )


def block_device_of(path: Path) -> str | None:
    """``MAJOR:MINOR`` of the whole disk holding ``path``, or None if it is not on one.

    io.max takes whole disks, so a partition is mapped to the disk that contains it.
    """
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        return None
    if (node / "partition").exists():
        return (node.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse a flat keyed file such as cgroup.events or cpu.stat."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


@dataclass(frozen=True)
class JobCgroup:
    """The cgroup of one job. Its processes join it before the job's program runs."""

    path: Path

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def events_file(self) -> Path:
        return self.path / "cgroup.events"

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except FileNotFoundError:
            return []

    def populated(self) -> bool:
        try:
            return _read_keyed(self.events_file).get("populated", 0) == 1
        except FileNotFoundError:
            return False

    def open_init(self) -> int | None:
        """A pidfd of the job's init (PID 1 of the job's namespace), found in this cgroup.

        The pid comes from ``cgroup.procs`` and is checked again after the pidfd is open, so
        it can never name a process outside the job (pid reuse).
        """
        for pid in self.pids():
            if _namespace_pids(pid)[1:] != ["1"]:
                continue
            pidfd = os.pidfd_open(pid)
            if pid in self.pids() and _namespace_pids(pid)[1:] == ["1"]:
                return pidfd
            os.close(pidfd)
        return None

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and its descendants, atomically (cgroup.kill)."""
        with contextlib.suppress(FileNotFoundError):
            _write(self.path / "cgroup.kill", "1")

    def usage(self) -> Usage:
        """What the kernel counts for the cgroup; a figure it does not keep here is None."""
        cpu = _read_optional(self.path / "cpu.stat") or {}
        memory = _read_optional(self.path / "memory.events") or {}
        pids = _read_optional(self.path / "pids.events") or {}
        io = _read_io_stat(self.path / "io.stat")
        return Usage(
            cpu_usec=cpu.get("usage_usec"),
            memory_peak_bytes=_read_optional_int(self.path / "memory.peak"),
            oom_kills=memory.get("oom_kill"),
            cpu_throttled_usec=cpu.get("throttled_usec"),
            pids_limit_hits=pids.get("max"),
            io_read_bytes=io.get("rbytes") if io is not None else None,
            io_write_bytes=io.get("wbytes") if io is not None else None,
        )

    def oom_killed(self) -> bool:
        events = _read_optional(self.path / "memory.events")
        return bool(events and events.get("oom_kill", 0) > 0)

    def remove(self) -> None:
        """Remove the (empty) cgroup and any child cgroups its processes created."""
        _remove_tree(str(self.path))


def _remove_tree(path: str) -> None:
    """rmdir a cgroup after its children, deepest first (``d_type``: no stat per file)."""
    try:
        children = [entry.path for entry in os.scandir(path) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for child in children:
        _remove_tree(child)
    _rmdir(Path(path))


def _namespace_pids(pid: int) -> list[str]:
    """A process's pid in each PID namespace from ours down (``NSpid``); [] if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return []
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return []


def _read_optional(path: Path) -> dict[str, int] | None:
    try:
        return _read_keyed(path)
    except FileNotFoundError:
        return None


def _read_io_stat(path: Path) -> dict[str, int] | None:
    """io.stat summed over devices: ``MAJ:MIN rbytes=1 wbytes=2 ...`` per line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    totals: dict[str, int] = {"rbytes": 0, "wbytes": 0}
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key in totals and value.isdigit():
                totals[key] += int(value)
    return totals


def _read_optional_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc


# Start-up problems, told so that an operator knows what to change (see docs/deploy.md).

_GIVE_A_CGROUP = (
    "in a container, a private cgroup namespace with a writable cgroup2 mount (docker or "
    "podman run --cgroupns=private --privileged; Kubernetes: privileged: true); under "
    "systemd, Delegate=yes; or point --cgroup-root (cgroup_root) at a cgroup directory "
    "delegated to it. See docs/deploy.md"
)


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def read_only_message(path: Path) -> str:
    """Why the worker cannot start on a read-only cgroup2 mount, and what to change."""
    return (
        f"cannot create cgroups under {path}: the cgroup2 file system is mounted read-only "
        "here, so the worker cannot give its jobs cgroups. Give it a writable cgroup of its "
        f"own: {_GIVE_A_CGROUP}"
    )


def not_writable_error(path: Path, exc: OSError) -> ConfigError:
    """The start-up error for a cgroup directory the worker cannot create or write."""
    if exc.errno == errno.EROFS:
        return ConfigError(read_only_message(path))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot write to cgroup {path} ({exc.strerror}): the worker needs a cgroup "
            f"delegated to it that it may write. Run it as root, with {_GIVE_A_CGROUP}"
        )
    return ConfigError(f"cannot set up cgroup {path}: {exc.strerror}")


def _other_processes(cgroup: Path) -> list[int]:
    """The pids in ``cgroup`` other than this process (0: outside our PID namespace)."""
    try:
        pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []
    return [pid for pid in pids if pid != os.getpid()]


def _describe_processes(pids: Sequence[int], limit: int = 5) -> str:
    outside = sum(1 for pid in pids if pid == 0)
    visible = [pid for pid in pids if pid != 0]
    parts = []
    for pid in visible[:limit]:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = ""
        parts.append(f"{pid} ({comm})" if comm else str(pid))
    if len(visible) > limit:
        parts.append(f"{len(visible) - limit} more")
    if outside:
        parts.append(f"{outside} outside this PID namespace")
    return ", ".join(parts)


def internal_processes_message(
    cgroup: Path, controllers: Sequence[str], pids: Sequence[int]
) -> str:
    """Why the controllers cannot be passed on from ``cgroup``, and what to change."""
    return (
        f"cannot enable the {', '.join(controllers)} controllers for jobs: cgroup {cgroup} "
        f"holds processes that are not the worker's (pids {_describe_processes(pids)}), and "
        "cgroup v2 lets a cgroup pass controllers to its children only while it holds no "
        "processes itself (the 'no internal processes' rule). Jobs run without those limits. "
        "Start the worker as the only process of its cgroup (the entrypoint of a container "
        "with its own cgroup namespace, or a systemd service with Delegate=yes), or point "
        "--cgroup-root (cgroup_root) at a delegated cgroup that holds no processes"
    )


class CgroupTree:
    """The cgroup subtree delegated to one worker, and the job cgroups inside it."""

    def __init__(self, root: Path | None = None) -> None:
        self._requested_root = root
        self.root = Path()
        self.jobs = Path()
        self.controllers: frozenset[str] = frozenset()
        self._created_root = False
        self._own = Path()

    def prepare(self) -> Path:
        """Find ROOT and create it if needed; nothing in it is touched yet."""
        mount = find_cgroup2_mount()
        own = mount / own_cgroup().lstrip("/")
        root = self._requested_root or own
        if not (root / "cgroup.type").exists() and root == mount:
            # The hierarchy's real root: keep out of it and use a subtree of our own.
            root = root / "jobworker"
        if _read_only(mount):
            raise ConfigError(read_only_message(mount))
        try:
            root.mkdir(exist_ok=False)
            self._created_root = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise not_writable_error(root, exc) from exc
        if not (root / "cgroup.procs").exists():
            raise ConfigError(f"{root} is not a cgroup v2 directory")
        self.root = root
        self._own = own
        return root

    def setup(self) -> None:
        """Prepare ROOT (after :meth:`prepare`): leaf for this process if needed,
        controllers, the ``jobs`` parent."""
        root = self.root
        if self._own == root:
            self._move_self_to_leaf()
        self._enable_controllers(root)
        self.jobs = root / "jobs"
        try:
            self.jobs.mkdir(exist_ok=True)
        except OSError as exc:
            raise not_writable_error(self.jobs, exc) from exc
        self._enable_controllers(self.jobs)
        self.controllers = frozenset(
            (self.jobs / "cgroup.subtree_control").read_text().split()
        ) & frozenset(CONTROLLERS)

    def _move_self_to_leaf(self) -> None:
        leaf = self.root / "server"
        try:
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
        except OSError as exc:
            raise not_writable_error(leaf, exc) from exc
        log.info("moved the worker into cgroup %s", leaf)

    def _enable_controllers(self, cgroup: Path) -> None:
        offered = set((cgroup / "cgroup.controllers").read_text().split())
        enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
        wanted = [name for name in CONTROLLERS if name in offered and name not in enabled]
        if not wanted:
            return
        others = _other_processes(cgroup)
        if others:
            # One clear warning instead of one EBUSY per controller.
            log.warning("%s", internal_processes_message(cgroup, wanted, others))
            return
        for name in wanted:
            try:
                _write(cgroup / "cgroup.subtree_control", f"+{name}")
            except OSError as exc:
                why = (
                    "it still holds processes that are not the worker's"
                    if exc.errno == errno.EBUSY
                    else exc.strerror
                )
                log.warning("cannot enable the %s controller in %s: %s", name, cgroup, why)

    def leftovers(self) -> list[JobCgroup]:
        """Job cgroups left behind by an earlier worker that did not shut down cleanly."""
        return [JobCgroup(p) for p in self.jobs.iterdir() if p.is_dir()]

    def create_job(self, job_id: str, limits: Limits, io_device: str | None) -> JobCgroup:
        """Create the cgroup of a new job and write its limits (all or nothing)."""
        path = self.jobs / job_id
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup for job {job_id}: {exc.strerror}") from exc
        cgroup = JobCgroup(path)
        try:
            for name, value in limit_files(limits, io_device):
                if name == "memory.swap.max" and not (path / name).exists():
                    continue  # no swap accounting: there is no swap to limit
                _write(path / name, value)
        except OSError as exc:
            cgroup.remove()
            raise CgroupError(f"cannot set limits for job {job_id}: {exc.strerror}") from exc
        return cgroup

    def teardown(self) -> None:
        """Remove the ``jobs`` parent, and ROOT if this worker created it and is not in it;
        a parent that still holds job cgroups (jobs left running) stays."""
        if any(p.is_dir() for p in self.jobs.iterdir()):
            return
        _rmdir(self.jobs)
        if self._created_root and not (self.root / "server").exists():
            _rmdir(self.root)


def limit_files(limits: Limits, io_device: str | None) -> Iterable[tuple[str, str]]:
    """The interface files and values that express ``limits``."""
    if limits.memory_bytes is not None:
        yield "memory.max", str(limits.memory_bytes)
        yield "memory.swap.max", "0"
    if limits.cpu_millis is not None:
        yield "cpu.max", f"{limits.cpu_millis * CPU_PERIOD_USEC // 1000} {CPU_PERIOD_USEC}"
    if limits.pids is not None:
        # The job's own processes, plus the helper's monitor and init (worker/process.py).
        yield "pids.max", str(limits.pids + HELPER_PROCESSES)
    io = []
    if limits.io_read_bps is not None:
        io.append(f"rbps={limits.io_read_bps}")
    if limits.io_write_bps is not None:
        io.append(f"wbps={limits.io_write_bps}")
    if io and io_device is not None:
        yield "io.max", f"{io_device} {' '.join(io)}"
