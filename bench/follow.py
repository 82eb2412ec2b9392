"""Follow latency: how long after a job writes a line a following client receives it.

A job (``ticker.py``) writes ``<n> <time.time_ns()>`` every 10 ms, starting 1 s after it
started (so the follower is attached and waiting); both processes read the same
CLOCK_REALTIME. jobworker: a client follows the job over gRPC. Baseline: a second ticker
job's log file followed directly in this process, woken by inotify (watch first, then read to
the end after every event) — what the kernel's notification costs without gRPC or TLS.
grpcio: a third ticker, started by the grpcio peer (``grpcio_peer.py``) and followed through
it with the same client.

The three take turns, round after round, each round in a different order, and each one's
delays are pooled over the rounds: all three are measured under the same conditions, and a
percentile rests on every round's lines, not on one stretch of time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

from bench.common import TICKER_SOURCE, Context, Section
from bench.proc import sample, self_cpu
from bench.server import BenchError
from bench.stats import percentile
from jobworker.client import Client

PERIOD = 0.01
DELAY = 1.0  # before the first line: the follower is attached and waiting by then


class _Lines:
    """Splits received bytes into lines and records each line's delay."""

    def __init__(self) -> None:
        self._partial = b""
        self.delays_ms: list[float] = []

    def feed(self, data: bytes, received_ns: int) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            n, stamp = line.split()
            if int(n) != len(self.delays_ms):
                raise BenchError(f"line {len(self.delays_ms)} expected, got line {int(n)}")
            self.delays_ms.append((received_ns - int(stamp)) / 1e6)


async def _follow_file(path: Path, count: int) -> list[float]:
    lines = _Lines()
    with Inotify() as inotify:
        inotify.add_watch(path, Mask.MODIFY)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset = 0
            while True:
                while data := os.pread(fd, 65536, offset):
                    lines.feed(data, time.time_ns())
                    offset += len(data)
                if len(lines.delays_ms) >= count:
                    return lines.delays_ms
                await inotify.get()
        finally:
            os.close(fd)


async def _follow_job(
    client: Client, pid: int, program: str, args: list[str], count: int, limit: float
) -> tuple[list[float], float, float]:
    """Start a ticker and follow it to its end; (delays in ms, CPU % of process ``pid`` and
    of this process meanwhile)."""
    lines = _Lines()
    job = await client.start(program, args)
    s0, c0, t0 = sample(pid).cpu_s, self_cpu(), time.perf_counter()
    async with asyncio.timeout(limit), client.output(job.id) as output:
        async for data in output:
            lines.feed(data, time.time_ns())
    wall = time.perf_counter() - t0
    s1, c1 = sample(pid).cpu_s, self_cpu()
    if len(lines.delays_ms) != count:
        raise BenchError(f"the follower got {len(lines.delays_ms)} lines, not {count}")
    return lines.delays_ms, (s1 - s0) / wall * 100, (c1 - c0) / wall * 100


async def measure(ctx: Context, out: Section) -> None:
    count = ctx.mode.follow_lines
    rounds = ctx.mode.follow_rounds
    # The script travels as an argument: a job sees none of the host's /tmp, where a
    # checkout may live.
    args = ["-I", "-c", TICKER_SOURCE, str(count), str(PERIOD), str(DELAY)]
    timeout = DELAY + count * PERIOD * 3 + 10
    delays: dict[str, list[float]] = {"jobworker": [], "baseline": [], "grpcio": []}
    round_p99: dict[str, list[float]] = {name: [] for name in delays}
    server_cpu = {"jobworker": 0.0, "grpcio": 0.0}  # % of a core, averaged over the rounds
    client_cpu = {"jobworker": 0.0, "grpcio": 0.0}

    def record(name: str, values: list[float]) -> None:
        delays[name].extend(values)
        round_p99[name].append(percentile(values, 99))

    async with (
        ctx.server("follow") as server,
        ctx.peer("follow") as peer,
        server.client() as client,
        peer.client() as peer_client,
    ):

        async def follow_server(name: str, follower: Client, pid: int) -> None:
            values, server_percent, client_percent = await _follow_job(
                follower, pid, ctx.job_python, args, count, timeout
            )
            record(name, values)
            server_cpu[name] += server_percent / rounds
            client_cpu[name] += client_percent / rounds

        async def follow_baseline() -> None:
            job = await client.start(ctx.job_python, args)
            async with asyncio.timeout(timeout):
                record("baseline", await _follow_file(server.log_file(job.id), count))

        turns: list[Callable[[], Awaitable[None]]] = [
            lambda: follow_server("jobworker", client, server.pid),
            follow_baseline,
            lambda: follow_server("grpcio", peer_client, peer.pid),
        ]
        for r in range(rounds):
            for turn in turns[r % 3 :] + turns[: r % 3]:
                await turn()
    jobworker, baseline, grpcio = delays["jobworker"], delays["baseline"], delays["grpcio"]
    base = "inotify + read, in process"
    per_round = "; ".join(
        f"{name} " + " ".join(f"{v:.2f}" for v in values) for name, values in round_p99.items()
    )
    for q in (50, 99):
        out.add(
            f"follow delay p{q}",
            percentile(jobworker, q),
            "ms",
            percentile(baseline, q),
            base,
            grpcio=percentile(grpcio, q),
            note=f"{rounds} rounds pooled; each round's p99: {per_round}"
            if q == 99 and rounds > 1
            else "",
        )
    out.add("follow delay max", max(jobworker), "ms", max(baseline), base, grpcio=max(grpcio))
    out.add(
        "CPU while following",
        server_cpu["jobworker"],
        "%",
        note=f"server; client {client_cpu['jobworker']:.1f}% "
        f"(grpcio: {client_cpu['grpcio']:.1f}%); "
        f"one 20-byte line per 10 ms; {rounds} x {count} lines",
        grpcio=server_cpu["grpcio"],
    )
    out.data = {
        "lines": count,
        "rounds": rounds,
        "period_s": PERIOD,
        "round_p99_ms": round_p99,
        "jobworker_ms": {q: percentile(jobworker, q) for q in (50, 90, 99, 100)},
        "baseline_ms": {q: percentile(baseline, q) for q in (50, 90, 99, 100)},
        "grpcio_ms": {q: percentile(grpcio, q) for q in (50, 90, 99, 100)},
        "jobworker_delays_ms": jobworker,
        "baseline_delays_ms": baseline,
        "grpcio_delays_ms": grpcio,
    }
