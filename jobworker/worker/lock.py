"""One server per data directory and per cgroup root: an exclusive ``flock`` on each.

The lock is held for as long as the worker runs, on a descriptor no child inherits
(close-on-exec, and jobs are started with nothing but their stdio), and the kernel drops it
when the process ends however it ends, so a crashed server never leaves a stale lock. A
second server that would share either is refused with one line naming the holder's pid,
read from ``/proc/locks``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobworker.errors import ConfigError

__all__ = ["exclusive", "lock_holder"]


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a file or a directory) inside the block.

    ``what`` names the resource in the error, e.g. ``"data directory /var/lib/jobworker"``.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if path.is_dir() else os.O_CREAT)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock the {what}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"another jobworker server ({who}) already uses the {what}; stop it first, "
                "or give this one its own --data-dir and --cgroup-root"
            ) from None
        yield
    finally:
        os.close(fd)


def lock_holder(fd: int, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid holding a FLOCK on the file open as ``fd``, from ``/proc/locks``."""
    info = os.fstat(fd)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = locks.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF"
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == wanted and fields[4].isdigit():
            return int(fields[4])
    return None
