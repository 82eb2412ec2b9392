"""The worker's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobworker.errors import ConfigError
from jobworker.worker.models import Limits

__all__ = ["WorkerConfig"]


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
    """

    data_dir: Path
    cgroup_root: Path | None = None
    chunk_size: int = 256 * 1024  # fewer, larger messages: see docs/performance.md
    stop_grace: float = 10.0
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    io_device: str | None = None
    reap_orphans: bool = False

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
        return self
