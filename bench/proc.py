"""What a process costs, read from /proc: CPU time, resident memory, threads, descriptors."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # utime + stime of every thread
    rss_bytes: int
    peak_rss_bytes: int
    threads: int
    fds: int


def sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        status[name] = value.strip()
    return ProcSample(
        cpu_s=cpu,
        rss_bytes=int(status["VmRSS"].split()[0]) * 1024,
        peak_rss_bytes=int(status["VmHWM"].split()[0]) * 1024,
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def nofile_limit(pid: int) -> str:
    """The soft/hard open-file limit of a process, as /proc/<pid>/limits says."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def self_cpu() -> float:
    """CPU seconds this (benchmark) process used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile(at_least: int = 0) -> tuple[int, int]:
    """Raise this process's descriptor limits (children inherit them): the soft one to the
    hard one, and both to ``at_least`` where the hard one is lower and the kernel lets root
    raise it (``fs.nr_open``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < at_least:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, at_least))
        except (ValueError, OSError) as exc:
            print(f"cannot raise the open-file limit to {at_least}: {exc}", file=sys.stderr)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True)
class MachineCpu:
    """The whole machine's busy CPU time, and this process's and its reaped children's."""

    busy_s: float
    own_s: float

    @classmethod
    def now(cls) -> MachineCpu:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            busy_s=(user + nice + system + irq + softirq + steal) / _CLK_TCK,
            own_s=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        )

    def others_since(self, earlier: MachineCpu) -> float:
        """CPU seconds used meanwhile by processes that are not this benchmark's."""
        return max(0.0, (self.busy_s - earlier.busy_s) - (self.own_s - earlier.own_s))
