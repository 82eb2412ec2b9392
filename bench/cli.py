"""CLI latency: whole ``jobworker`` processes beside a bare ``python -c pass``.

Each command runs as a new process of the server's interpreter, as a shell loop over job ids
would run it, and alternates with the baseline so both see the same noise. ``status ID`` goes
to a real server over mutual TLS; ``--help`` and ``--version`` reach no server.
"""

from __future__ import annotations

import asyncio
import os
import time

from bench.common import Context, Section
from bench.stats import median

_WARMUP = 3


async def _run(argv: list[str], env: dict[str, str]) -> float:
    """Milliseconds from spawn to exit of ``argv``; it must succeed."""
    t0 = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    elapsed = (time.perf_counter() - t0) * 1000
    if process.returncode != 0:
        raise RuntimeError(f"{argv[2:]} exited {process.returncode}: {err.decode().strip()}")
    return elapsed


async def measure(ctx: Context, out: Section) -> None:
    python = ctx.python
    pki = ctx.workspace.pki
    async with ctx.server("cli") as server, server.client() as client:
        job = await client.start("/bin/true")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "JOBWORKER_SERVER": f"127.0.0.1:{server.port}",
            "JOBWORKER_CERT": str(pki.admin_cert),
            "JOBWORKER_KEY": str(pki.admin_key),
            "JOBWORKER_CA": str(pki.server_ca),
        }
        commands = {
            "jobworker --help": [python, "-m", "jobworker", "--help"],
            "jobworker --version": [python, "-m", "jobworker", "--version"],
            "jobworker status ID": [python, "-m", "jobworker", "status", job.id],
        }
        baseline_argv = [python, "-c", "pass"]
        for argv in [*commands.values(), baseline_argv] * _WARMUP:
            await _run(argv, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        baseline: list[float] = []
        for _ in range(ctx.mode.cli_runs):
            for name, argv in commands.items():
                times[name].append(await _run(argv, env))
                baseline.append(await _run(baseline_argv, env))
    base = "python -c pass"
    for name, samples in times.items():
        out.add(f"{name} median", median(samples), "ms", median(baseline), base)
    out.data = {
        "runs": ctx.mode.cli_runs,
        "baseline_ms": median(baseline),
        **{name: median(samples) for name, samples in times.items()},
    }
