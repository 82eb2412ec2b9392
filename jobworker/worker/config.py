"""The worker's configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from jobworker.errors import ConfigError
from jobworker.models import MAX_OUTPUT_RANGE, Limits, Network, format_size, parse_size

__all__ = ["DEFAULT_JOB_UIDS", "MinFree", "OnExit", "WorkerConfig", "parse_uid_range"]


class OnExit(enum.Enum):
    """What leaving the worker does to the jobs still running."""

    STOP = "stop"  # stop them (SIGTERM, grace, cgroup.kill) and wait until they are gone
    KEEP = "keep"  # leave them running, for the next worker on this data directory to adopt


@dataclass(frozen=True)
class MinFree:
    """Free space to keep on the data directory's filesystem: bytes, or a percentage of it."""

    size: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> MinFree:
        """``512M``, ``2G`` or ``5%``."""
        text = text.strip()
        try:
            if text.endswith("%"):
                free = cls(percent=float(text[:-1]))
            else:
                free = cls(size=parse_size(text))
        except ValueError:
            raise ConfigError(
                f"a minimum of free space is a size such as 512M or a percentage such as 5%, "
                f"not {text!r}"
            ) from None
        return free.validate()

    def validate(self) -> MinFree:
        if not 0 <= self.percent < 100 or self.size < 0:
            raise ConfigError(f"a minimum of free space must be 0 to 99%, or a size, not {self}")
        return self

    def bytes_of(self, total: int) -> int:
        """The bytes to keep free on a filesystem of ``total`` bytes."""
        return max(self.size, int(total * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else format_size(self.size)


# Unprivileged uids (and gids of the same number) for jobs, one per running job. systemd
# names 65536-524287 unused (docs/UIDS-GIDS.md of systemd), and shadow's useradd hands out
# subordinate uids for user namespaces from 100000: this range stays clear of both, of
# systemd's DynamicUser= range (61184-65519), of nobody (65534) and of (uint16_t)-1.
DEFAULT_JOB_UIDS: Final = (65536, 99999)
_RESERVED_UIDS: Final = {0: "root", 65534: "nobody", 65535: "(uint16_t) -1"}
_MAX_UID: Final = 2**31 - 1


@dataclass(frozen=True)
class WorkerConfig:
    """How a :class:`~jobworker.worker.Worker` runs its jobs.

    ``cgroup_root`` is the cgroup v2 directory delegated to the worker; ``None`` means the
    worker's own cgroup (see ``docs/design.md``). ``io_device`` is the ``MAJOR:MINOR`` of the
    block device that I/O limits apply to; ``None`` means the device holding ``data_dir``.
    ``reap_orphans`` makes the worker collect the exit status of every child process that is
    not one of its jobs' main processes (see ``worker/reaper.py``): turn it on when this
    process is a child subreaper or PID 1 and the worker is the only part of it that starts
    child processes.

    Who a job runs as (see ``docs/security.md``): by default a uid of its own from
    ``job_uids`` (inclusive), never shared with another running job; with ``run_as``, that
    host account for every job instead. A job may name an account itself only if it is in
    ``allowed_users`` (the server lets only admins ask). ``default_network`` is the network
    of jobs that do not choose one. ``on_exit`` is what leaving the worker does to running
    jobs (see :class:`OnExit`).

    Output: ``default_max_output`` is the output cap of jobs that ask for none and
    ``max_max_output`` the largest a job may ask for (``None``: no default cap, no maximum);
    past its cap a job's log keeps its head and its tail (see ``worker/holes.py``).
    ``min_free`` is the free space below which new jobs are refused (``None``: no minimum).

    Retention of ended jobs (their records, logs and working directories): ``retain_for``
    seconds after its end, and only the newest ``retain_jobs`` ended jobs (``None``: keep).
    """

    data_dir: Path
    cgroup_root: Path | None = None
    chunk_size: int = 256 * 1024  # fewer, larger messages: see docs/performance.md
    stop_grace: float = 10.0
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    io_device: str | None = None
    reap_orphans: bool = False
    job_uids: tuple[int, int] = DEFAULT_JOB_UIDS
    run_as: str | None = None
    allowed_users: frozenset[str] = frozenset()
    default_network: Network = Network.HOST
    on_exit: OnExit = OnExit.STOP
    default_max_output: int | None = None
    max_max_output: int | None = None
    min_free: MinFree | None = None
    retain_for: float | None = None
    retain_jobs: int | None = None

    def validate(self) -> WorkerConfig:
        if not 1 <= self.chunk_size <= 4 * 1024 * 1024:
            raise ConfigError(f"chunk size must be 1 byte to 4 MiB, not {self.chunk_size}")
        if not 0 <= self.stop_grace <= 3600:
            raise ConfigError(f"stop grace must be 0 to 3600 seconds, not {self.stop_grace}")
        self.default_limits.validate()
        self.max_limits.validate()
        if over := self.default_limits.exceeding(self.max_limits):
            names = ", ".join(sorted(over))
            raise ConfigError(f"default limits must be set and within the maximum for: {names}")
        _validate_uid_range(self.job_uids)
        low, high = MAX_OUTPUT_RANGE
        for name in ("default_max_output", "max_max_output"):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{name} must be 1 MiB to {high} bytes, not {value}")
        top, default = self.max_max_output, self.default_max_output
        if top is not None and default is not None and default > top:
            raise ConfigError(f"the default output cap {default} is above the maximum {top}")
        if self.min_free is not None:
            self.min_free.validate()
        if self.retain_for is not None and not 0 <= self.retain_for < float("inf"):
            raise ConfigError(f"retain-for must be a duration of 0 or more, not {self.retain_for}")
        if self.retain_jobs is not None and self.retain_jobs < 0:
            raise ConfigError(f"retain-jobs must be 0 or more, not {self.retain_jobs}")
        return self


def _validate_uid_range(uids: tuple[int, int]) -> None:
    first, last = uids
    if not 1 <= first <= last <= _MAX_UID:
        raise ConfigError(
            f"job uids must be a range FIRST-LAST with 1 <= FIRST <= LAST <= {_MAX_UID}, "
            f"not {first}-{last}"
        )
    for uid, name in _RESERVED_UIDS.items():
        if first <= uid <= last:
            raise ConfigError(f"job uids {first}-{last} include {uid} ({name}); leave it out")


def parse_uid_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST`` (inclusive) as a pair, checked as :class:`WorkerConfig` checks it."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ConfigError(f"job uids must be a range FIRST-LAST such as 65536-99999, not {text!r}")
    uids = (int(first), int(last))
    _validate_uid_range(uids)
    return uids
