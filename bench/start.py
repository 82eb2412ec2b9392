"""Start latency: StartJob of /bin/true against a bare spawn plus an empty RPC.

The baseline is what any gRPC service that starts a process must pay: ``asyncio``'s
``create_subprocess_exec('/bin/true')`` in this process plus an empty unary RPC (the gRPC
health Check) on the same connection. grpcio: StartJob of /bin/true on the grpcio peer
(``grpcio_peer.py``: a log file and that same spawn behind a grpcio RPC, nothing else), on a
connection of its own. The three alternate, so all see the same noise.
"""

from __future__ import annotations

import asyncio
import time

from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from bench.common import Context, Section
from bench.proc import self_cpu
from bench.stats import median, percentile

_WARMUP = 20


async def _baseline(health: HealthStub) -> float:
    t0 = time.perf_counter()
    process = await asyncio.create_subprocess_exec("/bin/true")
    await health.Check(HealthCheckRequest())
    elapsed = time.perf_counter() - t0
    await process.wait()
    return elapsed * 1000


async def measure(ctx: Context, out: Section) -> None:
    n = ctx.mode.starts
    async with (
        ctx.server("start") as server,
        ctx.peer("start") as peer,
        server.client() as client,
        peer.client() as peer_client,
    ):
        health = HealthStub(client.stub.channel)
        for _ in range(_WARMUP):
            await client.start("/bin/true")
            await _baseline(health)
            await peer_client.start("/bin/true")
        before, cpu0, peer0 = server.sample(), self_cpu(), peer.sample()
        jobworker: list[float] = []
        baseline: list[float] = []
        grpcio: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.start("/bin/true")
            jobworker.append((time.perf_counter() - t0) * 1000)
            baseline.append(await _baseline(health))
            t0 = time.perf_counter()
            await peer_client.start("/bin/true")
            grpcio.append((time.perf_counter() - t0) * 1000)
        after, cpu1, peer1 = server.sample(), self_cpu(), peer.sample()
        await asyncio.sleep(0.5)  # the last jobs end; they all must have completed
        jobs = await client.list()
        not_done = [j.id for j in jobs if j.state.name != "COMPLETED" or j.exit_code != 0]
        if len(jobs) != n + _WARMUP or not_done:
            raise RuntimeError(f"{len(not_done)} of {len(jobs)} /bin/true jobs did not complete")
    base = "spawn + Health/Check"
    for q in (50, 99):
        out.add(
            f"StartJob p{q}",
            percentile(jobworker, q),
            "ms",
            percentile(baseline, q),
            base,
            grpcio=percentile(grpcio, q),
        )
    out.add(
        "StartJob mean", sum(jobworker) / n, "ms", sum(baseline) / n, base, grpcio=sum(grpcio) / n
    )
    out.add(
        "server CPU per start",
        (after.cpu_s - before.cpu_s) / n * 1000,
        "ms",
        note="incl. supervising the job's end and the baseline's Health/Check",
        grpcio=(peer1.cpu_s - peer0.cpu_s) / n * 1000,
    )
    out.add(
        "bench CPU per start+baseline", (cpu1 - cpu0) / n * 1000, "ms", note="and grpcio's start"
    )
    out.data = {
        "n": n,
        "jobworker_ms": {"p50": percentile(jobworker, 50), "p99": percentile(jobworker, 99),
                         "median": median(jobworker), "max": max(jobworker)},
        "baseline_ms": {"p50": percentile(baseline, 50), "p99": percentile(baseline, 99),
                        "median": median(baseline), "max": max(baseline)},
        "grpcio_ms": {"p50": percentile(grpcio, 50), "p99": percentile(grpcio, 99),
                      "median": median(grpcio), "max": max(grpcio)},
        "server_threads_after": after.threads,
    }  # fmt: skip
