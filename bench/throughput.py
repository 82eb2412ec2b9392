"""Output throughput: one client streaming a job's output, against two baselines.

A job (``writer.py``) writes N MiB of a fixed pattern as fast as it can. Measured, with every
byte checked against the pattern on every path:

- jobworker, live: one client follows the job from the first byte while it writes;
- jobworker, finished: one client streams the finished job's whole output;
- baseline, file: plain ``os.pread`` of the same log file in chunk-sized pieces;
- baseline, TLS socket: the same bytes read from the same file and sent over a plain mutual
  TLS 1.3 connection on loopback with asyncio streams (``tls_sender.py``, its own process);
- jobworker, N clients: N connections streaming the finished job at once (aggregate).

Each jobworker measurement is repeated against the grpcio peer (``grpcio_peer.py``, its own
process, the same TLS files and chunk size), with the same client library and the same
checks, alternating run by run: live, the peer's own writer job; finished and N clients,
jobworker's very log file (a hard link in the peer's directory).
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import REPO_ROOT, WRITER_SOURCE, Context, Section
from bench.proc import sample, self_cpu
from bench.server import BenchError, PeerProcess, ServerProcess
from bench.stats import MIB, median, mib_per_s
from bench.writer import PERIOD, pattern
from jobworker.client import Client
from jobworker.client.tls import client_ssl_context


class PatternChecker:
    """Checks that bytes at an offset are the writer's pattern."""

    def __init__(self) -> None:
        self._doubled = pattern() * 2

    def check(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            start = (offset + pos) % PERIOD
            take = min(len(data) - pos, PERIOD)
            piece = data if pos == 0 and take == len(data) else data[pos : pos + take]
            if self._doubled[start : start + take] != piece:
                raise BenchError(f"wrong bytes in the output at offsets {offset + pos}..")
            pos += take


async def _stream(
    client: Client,
    job_id: str,
    checker: PatternChecker,
    total: int,
    first_at: list[int] | None = None,
) -> tuple[int, float]:
    """Stream a job's whole output, ``total`` bytes; (bytes after the first chunk, seconds
    since it came).

    ``first_at`` gets the wall-clock time (ns) at which the first chunk came.
    """
    async with client.output(job_id) as output:
        first = await output.next_chunk()
        if first is None:
            raise BenchError(f"the output of job {job_id} ended before its first byte")
        if first_at is not None:
            first_at.append(time.time_ns())
        checker.check(first.offset, first.data)
        t0 = time.perf_counter()
        while (chunk := await output.next_chunk()) is not None:
            checker.check(chunk.offset, chunk.data)
        elapsed = time.perf_counter() - t0
        if output.offset != total:
            raise BenchError(f"the stream of job {job_id} ended at {output.offset}, not {total}")
        return output.offset - len(first.data), elapsed


def _read_file(path: Path, chunk: int, checker: PatternChecker) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while data := os.pread(fd, chunk, offset):
            checker.check(offset, data)
            offset += len(data)
        return offset
    finally:
        os.close(fd)


async def _read_tls(port: int, context: ssl.SSLContext, chunk: int, checker: PatternChecker) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(b"send\n")
        offset = 0
        while data := await reader.read(chunk):
            checker.check(offset, data)
            offset += len(data)
        return offset
    finally:
        writer.close()


class _Measured:
    """Wall time, MiB/s, and the CPU the server and this process used meanwhile."""

    def __init__(self, pid: int, who: str = "server") -> None:
        self._pid = pid
        self._who = who
        self.rates: list[float] = []
        self.server_cpu: list[float] = []
        self.bench_cpu: list[float] = []

    async def run(self, call: Callable[[], Awaitable[tuple[int, float | None]]]) -> None:
        s0, c0, t0 = sample(self._pid).cpu_s, self_cpu(), time.perf_counter()
        nbytes, seconds = await call()
        wall = time.perf_counter() - t0
        s1, c1 = sample(self._pid).cpu_s, self_cpu()
        self.rates.append(mib_per_s(nbytes, seconds if seconds is not None else wall))
        self.server_cpu.append((s1 - s0) / wall * 100)
        self.bench_cpu.append((c1 - c0) / wall * 100)

    @property
    def rate(self) -> float:
        return median(self.rates)

    def note(self, peer: _Measured | None = None) -> str:
        text = (
            f"CPU: {self._who} {median(self.server_cpu):.0f}%, client {median(self.bench_cpu):.0f}%"
        )
        if peer is not None:
            text += f"; grpcio {median(peer.server_cpu):.0f}%, client {median(peer.bench_cpu):.0f}%"
        return text


async def _many(
    server: ServerProcess | PeerProcess, job_id: str, checker: PatternChecker, n: int, total: int
) -> tuple[int, float | None]:
    """N clients, one connection each, streaming the finished job at once."""
    clients = [server.client() for _ in range(n)]
    try:
        async with asyncio.TaskGroup() as group:
            for c in clients:
                await c.__aenter__()
                group.create_task(_stream(c, job_id, checker, total))
    finally:
        for c in clients:
            await c.aclose()
    return n * total, None


async def measure(ctx: Context, out: Section) -> None:
    total = ctx.mode.throughput_mib * MIB
    chunk = ctx.effective_chunk
    checker = PatternChecker()
    pki = ctx.workspace.pki
    async with (
        ctx.server("throughput") as server,
        ctx.peer("throughput") as peer,
        server.client() as client,
        peer.client() as peer_client,
    ):
        # Live: follow the writer from its first byte; jobworker's and the peer's in turn.
        live, peer_live = _Measured(server.pid), _Measured(peer.pid, "grpcio")
        job_ids: list[str] = []
        first_at: list[int] = []
        peer_job_ids: list[str] = []
        peer_first_at: list[int] = []

        async def live_run(c: Client, ids: list[str], first: list[int]) -> tuple[int, float | None]:
            # The script travels as an argument: a job sees none of the host's /tmp.
            job = await c.start(ctx.job_python, ["-I", "-c", WRITER_SOURCE, str(total)])
            ids.append(job.id)
            return await _stream(c, job.id, checker, total, first)

        for _ in range(ctx.mode.repeats):
            await live.run(lambda: live_run(client, job_ids, first_at))
            await peer_live.run(lambda: live_run(peer_client, peer_job_ids, peer_first_at))
        job_id = job_ids[-1]
        final = await client.status(job_id)
        if final.exit_code != 0:
            raise BenchError(f"the writer job ended {final.state.name} ({final.exit_code})")
        # From the first byte the follower got to the job's last write (the log's mtime).
        writing = (server.log_file(job_id).stat().st_mtime_ns - first_at[-1]) / 1e9
        writer_rate = mib_per_s(total, writing)
        peer_log = peer.log_file(peer_job_ids[-1])
        peer_writer_rate = mib_per_s(total, (peer_log.stat().st_mtime_ns - peer_first_at[-1]) / 1e9)
        for other in job_ids[:-1]:  # only one log file of this size stays on disk
            server.log_file(other).unlink()
        for other in peer_job_ids:
            peer.log_file(other).unlink()
        log_path = server.log_file(job_id)
        if log_path.stat().st_size != total:
            raise BenchError(f"the log has {log_path.stat().st_size} bytes, not {total}")

        finished, peer_finished = _Measured(server.pid), _Measured(peer.pid, "grpcio")
        peer_job_id = peer.serve_file(log_path)
        for _ in range(ctx.mode.repeats):
            await finished.run(lambda: _stream(client, job_id, checker, total))
            await peer_finished.run(lambda: _stream(peer_client, peer_job_id, checker, total))

        # Baseline 1: plain reads of the same file.
        file_rates = []
        for _ in range(ctx.mode.repeats):
            t0 = time.perf_counter()
            nbytes = _read_file(log_path, chunk, checker)
            file_rates.append(mib_per_s(nbytes, time.perf_counter() - t0))

        # Baseline 2: the same bytes over a plain TLS 1.3 socket, sent by another process.
        context = client_ssl_context(pki.admin_cert, pki.admin_key, pki.server_ca)
        sender = await asyncio.create_subprocess_exec(
            ctx.python,
            *("-m", "bench.tls_sender", "--file", str(log_path), "--chunk", str(chunk)),
            *("--cert", str(pki.server_cert), "--key", str(pki.server_key)),
            *("--ca", str(pki.client_ca)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        try:
            assert sender.stdout is not None
            port = int(await asyncio.wait_for(sender.stdout.readline(), 30))
            tls = _Measured(sender.pid, "sender")

            async def tls_run() -> tuple[int, float | None]:
                nbytes = await _read_tls(port, context, chunk, checker)
                if nbytes != total:
                    raise BenchError(f"the TLS baseline got {nbytes} bytes, not {total}")
                return nbytes, None

            for _ in range(ctx.mode.repeats):
                await tls.run(tls_run)
        finally:
            if sender.stdin is not None:
                sender.stdin.close()
            try:
                await asyncio.wait_for(sender.wait(), 10)
            except TimeoutError:
                sender.kill()
                await sender.wait()

        # N clients, one connection each, streaming the finished job at once.
        many, peer_many = _Measured(server.pid), _Measured(peer.pid, "grpcio")
        n = ctx.mode.clients
        await many.run(lambda: _many(server, job_id, checker, n, total))
        await peer_many.run(lambda: _many(peer, peer_job_id, checker, n, total))

    tls_rate = median(tls.rates)
    file_rate = median(file_rates)
    tls_name = "plain TLS 1.3 socket"
    out.add(
        "1 client, live",
        live.rate,
        "MiB/s",
        tls_rate,
        tls_name,
        live.note(peer_live),
        grpcio=peer_live.rate,
    )
    out.add(
        "the job writing it",
        writer_rate,
        "MiB/s",
        note="its first byte to its last write: what a live stream can keep up with"
        if not math.isnan(writer_rate)
        else "it had written everything before the first byte arrived",
        grpcio=peer_writer_rate,
    )
    out.add(
        "1 client, finished job",
        finished.rate,
        "MiB/s",
        tls_rate,
        tls_name,
        finished.note(peer_finished),
        grpcio=peer_finished.rate,
    )
    out.add(
        "1 client, finished job",
        finished.rate,
        "MiB/s",
        file_rate,
        "plain file reads",
        grpcio=peer_finished.rate,
    )
    out.add("plain TLS 1.3 socket", tls_rate, "MiB/s", file_rate, "plain file reads", tls.note())
    out.add(
        f"{n} clients, aggregate",
        many.rate,
        "MiB/s",
        tls_rate,
        tls_name,
        many.note(peer_many),
        grpcio=peer_many.rate,
    )
    out.data = {
        "mib": ctx.mode.throughput_mib,
        "chunk_bytes": chunk,
        "live_mib_s": live.rates,
        "writer_mib_s": writer_rate,
        "finished_mib_s": finished.rates,
        "file_mib_s": file_rates,
        "tls_mib_s": tls.rates,
        "clients": n,
        "clients_aggregate_mib_s": many.rates,
        "grpcio": {
            "live_mib_s": peer_live.rates,
            "writer_mib_s": peer_writer_rate,
            "finished_mib_s": peer_finished.rates,
            "clients_aggregate_mib_s": peer_many.rates,
            "server_cpu_percent": {
                "live": peer_live.server_cpu,
                "finished": peer_finished.server_cpu,
                "clients": peer_many.server_cpu,
            },
            "bench_cpu_percent": {
                "live": peer_live.bench_cpu,
                "finished": peer_finished.bench_cpu,
                "clients": peer_many.bench_cpu,
            },
        },
        "server_cpu_percent": {
            "live": live.server_cpu,
            "finished": finished.server_cpu,
            "clients": many.server_cpu,
        },
        "bench_cpu_percent": {
            "live": live.bench_cpu,
            "finished": finished.bench_cpu,
            "tls": tls.bench_cpu,
            "tls_sender": tls.server_cpu,
            "clients": many.bench_cpu,
        },
    }
