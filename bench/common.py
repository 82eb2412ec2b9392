"""What every measurement shares: the mode's sizes, the run's context, result rows."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.server import PeerProcess, ServerProcess, Workspace
from jobworker.worker import WorkerConfig

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WRITER = BENCH_DIR / "writer.py"
TICKER = BENCH_DIR / "ticker.py"
# Jobs get these scripts as arguments (python -c): a job sees none of the host's /tmp, where
# a checkout may live.
WRITER_SOURCE = WRITER.read_text()
TICKER_SOURCE = TICKER.read_text()
# The server's default chunk size, which the baselines read with when none is given.
DEFAULT_CHUNK = WorkerConfig(data_dir=Path()).chunk_size


@dataclass(frozen=True)
class Mode:
    name: str
    starts: int  # StartJob round trips (and as many baseline round trips)
    throughput_mib: int  # size of the output that is streamed
    repeats: int  # single-stream throughput runs; the median is reported
    clients: int  # concurrent clients streaming one finished job
    follow_lines: int  # timestamped lines, one every 10 ms, per round
    follow_rounds: int  # rounds of jobworker, baseline and grpcio, in turn
    scale_jobs: int  # concurrent sleeping jobs, and as many followers
    idle_seconds: float  # window for the idle followers' CPU use
    cli_runs: int  # runs of each CLI command (and as many of the bare interpreter)


QUICK = Mode("quick", 500, 32, 3, 16, 300, 1, 200, 5.0, 10)
FULL = Mode("full", 1000, 256, 3, 16, 1000, 3, 10_000, 10.0, 40)


def _job_python() -> str:
    """A python3 that a job may run: jobs run as an unprivileged uid of their own, and the
    bench's interpreter usually lives under root's home (0700)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no python3 that jobs may run in /usr/bin or /usr/local/bin")


@dataclass
class Context:
    mode: Mode
    workspace: Workspace
    python: str = sys.executable  # runs the server and the baselines' helper processes
    chunk_size: int | None = None  # None: the server's default
    server_nofile: int | None = None  # the server's soft open-file limit; None: inherited
    job_python: str = field(default_factory=_job_python)  # runs the writer/ticker jobs

    @property
    def effective_chunk(self) -> int:
        return self.chunk_size or DEFAULT_CHUNK

    def server(self, name: str) -> ServerProcess:
        return ServerProcess(
            self.workspace,
            name,
            python=self.python,
            chunk_size=self.chunk_size,
            nofile=self.server_nofile,
        )

    def peer(self, name: str) -> PeerProcess:
        """The grpcio peer (bench/grpcio_peer.py), with the server's chunk size."""
        return PeerProcess(
            self.workspace, name, python=self.python, chunk_size=self.effective_chunk
        )


@dataclass(frozen=True)
class Row:
    """One number, the baseline it is compared with, and the same number measured against
    the grpcio peer (bench/grpcio_peer.py), all in the same run."""

    section: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    note: str = ""
    grpcio: float | None = None

    @property
    def ratio(self) -> float | None:
        return _ratio(self.value, self.baseline)

    @property
    def vs_grpcio(self) -> float | None:
        """jobworker / grpcio: above 1 is better for MiB/s, below 1 for ms and CPU."""
        return _ratio(self.value, self.grpcio)


def _ratio(value: float, other: float | None) -> float | None:
    if other is None or not other or math.isnan(other):
        return None
    return value / other


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    background_cores: float = 0.0  # CPU used meanwhile by other processes of the machine
    error: str | None = None

    def add(
        self,
        metric: str,
        value: float,
        unit: str,
        baseline: float | None = None,
        baseline_name: str = "",
        note: str = "",
        grpcio: float | None = None,
    ) -> None:
        self.rows.append(Row(self.name, metric, value, unit, baseline, baseline_name, note, grpcio))


async def bounded(limit: int, calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls concurrently, at most ``limit`` at a time; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(call)) for call in calls]
    return [task.result() for task in tasks]
