"""Small helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from jobworker.worker import Worker


def open_fds() -> set[int]:
    """This process's open file descriptors."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def job_cgroups(worker: Worker) -> list[str]:
    """Names of the job cgroups that exist under the worker's cgroup root."""
    jobs = worker.cgroup_root / "jobs"
    return sorted(p.name for p in jobs.iterdir() if p.is_dir()) if jobs.exists() else []


def log_files(worker: Worker) -> list[str]:
    return sorted(p.name for p in (worker.config.data_dir / "logs").iterdir())


async def read_all(worker: Worker, job_id: str, offset: int = 0) -> bytes:
    """Every byte of a job's output from ``offset``, following it until the job ends."""
    out = bytearray()
    async with worker.output(job_id, offset) as stream:
        async for chunk in stream:
            assert chunk.offset == offset + len(out)
            assert 0 < len(chunk.data) <= worker.config.chunk_size
            out += chunk.data
    return bytes(out)
