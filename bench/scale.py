"""Scale: many concurrent jobs, and as many idle followers.

N jobs (``sh -c 'echo ready; exec sleep 3600'``) are started concurrently; then every job's
status is asked for, one call each; then N followers (one per job, spread over several
connections, since HTTP/2 allows 100 open streams per connection) read the job's first line
and wait; the server's CPU use over an idle window shows whether anything polls. Then the
followers leave and every job is stopped. Server RSS, threads and descriptors are read from
/proc at each step.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from functools import partial

from bench.common import Context, Section, bounded
from bench.proc import ProcSample, nofile_limit, self_cpu
from bench.server import BenchError
from jobworker.client import Client, OutputReader

_CONNECTIONS = 8  # for starting, asking and stopping
_IN_FLIGHT = 64
_FOLLOWERS_PER_CONNECTION = 90  # of the 100 streams HTTP/2 allows; 10,000 fit in 128 connections
_SCRIPT = "echo ready; exec sleep 3600"


def _mb(sample: ProcSample) -> float:
    return sample.rss_bytes / 1e6


async def measure(ctx: Context, out: Section) -> None:
    n = ctx.mode.scale_jobs
    samples: dict[str, ProcSample] = {}
    times: dict[str, float] = {}
    async with ctx.server("scale") as server, AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(server.client()) for _ in range(_CONNECTIONS)]
        await clients[0].list()  # connected
        samples["idle"] = server.sample()
        out.data["nofile_limit"] = nofile_limit(server.pid)

        t0 = time.perf_counter()
        started = await bounded(
            _IN_FLIGHT,
            (partial(clients[i % _CONNECTIONS].start, "sh", ["-c", _SCRIPT]) for i in range(n)),
        )
        times["start all"] = time.perf_counter() - t0
        ids = [job.id for job in started]
        samples["running"] = server.sample()

        t0 = time.perf_counter()
        statuses = await bounded(
            _IN_FLIGHT,
            (partial(clients[i % _CONNECTIONS].status, job_id) for i, job_id in enumerate(ids)),
        )
        times["status all"] = time.perf_counter() - t0
        if any(s.state.name != "RUNNING" for s in statuses):
            raise BenchError("a sleeping job is not running")
        t0 = time.perf_counter()
        listed = await clients[0].list()
        times["list all"] = time.perf_counter() - t0
        if len(listed) != n:
            raise BenchError(f"ListJobs returned {len(listed)} jobs, not {n}")

        # Followers: one per job, each past its first line, then idle.
        async with AsyncExitStack() as followers:
            connections = -(-n // _FOLLOWERS_PER_CONNECTION)
            follow_clients: list[Client] = [
                await followers.enter_async_context(server.client()) for _ in range(connections)
            ]

            async def follow(i: int, job_id: str) -> OutputReader:
                client = follow_clients[i // _FOLLOWERS_PER_CONNECTION]
                reader = await followers.enter_async_context(client.output(job_id))
                chunk = await reader.next_chunk()
                if chunk is None or chunk.data != b"ready\n":
                    raise BenchError(f"follower of {job_id} got {chunk!r}")
                return reader

            t0 = time.perf_counter()
            await bounded(
                _IN_FLIGHT,
                (partial(follow, i, job_id) for i, job_id in enumerate(ids)),
            )
            times["follow all"] = time.perf_counter() - t0
            await asyncio.sleep(1.0)  # let everything settle
            before, cpu0, t0 = server.sample(), self_cpu(), time.perf_counter()
            await asyncio.sleep(ctx.mode.idle_seconds)
            after, cpu1 = server.sample(), self_cpu()
            window = time.perf_counter() - t0
            samples["following"] = after
            idle_cpu = (after.cpu_s - before.cpu_s) / window * 100
            bench_idle_cpu = (cpu1 - cpu0) / window * 100
        # The followers are gone; the jobs still run.

        t0 = time.perf_counter()
        stopped = await bounded(
            _IN_FLIGHT,
            (partial(clients[i % _CONNECTIONS].stop, job_id) for i, job_id in enumerate(ids)),
        )
        times["stop all"] = time.perf_counter() - t0
        if any(s.state.name != "STOPPED" for s in stopped):
            raise BenchError("a job did not end STOPPED")
        samples["stopped"] = server.sample()

    out.add(f"start {n} jobs", times["start all"], "s", note=f"{n / times['start all']:.0f}/s")
    out.add(f"status of {n} jobs", times["status all"], "s", note="one GetJobStatus each")
    out.add(f"list {n} jobs", times["list all"] * 1000, "ms", note="one ListJobs")
    out.add(f"{n} followers attach", times["follow all"], "s")
    out.add(f"stop {n} jobs", times["stop all"], "s", note="SIGTERM; each waits for its cgroup")
    out.add("server RSS idle", _mb(samples["idle"]), "MB")
    out.add(
        f"server RSS, {n} jobs",
        _mb(samples["running"]),
        "MB",
        note=f"{samples['running'].threads} threads, {samples['running'].fds} fds",
    )
    out.add(
        f"server RSS, {n} jobs + followers",
        _mb(samples["following"]),
        "MB",
        note=f"{samples['following'].threads} threads, {samples['following'].fds} fds",
    )
    out.add("server RSS after stop", _mb(samples["stopped"]), "MB",
            note=f"peak {samples['stopped'].peak_rss_bytes / 1e6:.0f} MB")  # fmt: skip
    out.add(
        f"CPU, {n} idle followers",
        idle_cpu,
        "%",
        note=f"server over {ctx.mode.idle_seconds:.0f} s; client {bench_idle_cpu:.1f}%",
    )
    out.data.update(
        {
            "jobs": n,
            "seconds": times,
            "idle_cpu_percent": idle_cpu,
            "samples": {
                name: {
                    "rss_mb": _mb(s),
                    "peak_rss_mb": s.peak_rss_bytes / 1e6,
                    "threads": s.threads,
                    "fds": s.fds,
                }
                for name, s in samples.items()
            },
        }
    )
