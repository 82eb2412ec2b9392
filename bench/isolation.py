"""What each layer of a job's isolation costs to start, beside a bare spawn, in one run.

Every variant starts ``/bin/true`` and waits until it has been exec'd, then for its end; the
variants alternate, so all see the same noise:

- a bare ``create_subprocess_exec`` (the start baseline's spawn);
- the cgroup alone: a ``/bin/sh`` shim that joins a cgroup, then execs (the way jobs started
  before they were isolated);
- util-linux doing one layer each after that shim, to attribute the cost: ``setpriv`` for
  the uid drop (no groups, no_new_privs), ``unshare`` for the PID, mount, IPC and cgroup
  namespaces with a fresh ``/proc``, and the same with a network namespace;
- jobworker's own helper doing everything at once (``worker/process.py``: cgroup, namespaces,
  mounts, uid, exec report), with the host's network and with none.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import Context, Section
from bench.stats import percentile
from jobworker.models import Network
from jobworker.worker.accounts import Account
from jobworker.worker.process import Launch, spawn_job

_UID = 65534  # nobody: an unprivileged uid every Linux has
_SHIM = 'echo 0 >"$0" || exit 125; exec "$@"'
_UNSHARE = ["unshare", "--pid", "--fork", "--mount", "--ipc", "--cgroup", "--mount-proc"]


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError(f"{argv} failed")


def _variants(cgroup: Path, data: Path) -> dict[str, Callable[[], Awaitable[None]]]:
    procs = str(cgroup / "cgroup.procs")
    (data / "exits").mkdir(mode=0o700, exist_ok=True)
    exits = os.open(data / "exits", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    shim = ["/bin/sh", "-c", _SHIM, procs]
    setpriv = ["setpriv", f"--reuid={_UID}", f"--regid={_UID}", "--clear-groups"]
    setpriv.append("--no-new-privs")

    async def helper(network: Network) -> None:
        work = data / "work" / f"w{time.monotonic_ns()}"
        os.makedirs(work)
        launch = Launch(
            program="/bin/true",
            args=(),
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            account=Account("", _UID, _UID),
            network=network,
            cgroup=cgroup,
            data_dir=data,
            work_dir=work,
        )
        process = await spawn_job(launch, 1, exits)
        if await process.wait() != 0:
            raise RuntimeError("the helper's /bin/true failed")
        os.rmdir(work)

    return {
        "spawn /bin/true": lambda: _run("/bin/true"),
        "cgroup (sh shim)": lambda: _run(*shim, "/bin/true"),
        "+ uid drop (setpriv)": lambda: _run(*shim, *setpriv, "/bin/true"),
        "+ PID/mount/IPC/cgroup ns (unshare)": lambda: _run(*shim, *_UNSHARE, "/bin/true"),
        "+ network ns too (unshare --net)": lambda: _run(*shim, *_UNSHARE, "--net", "/bin/true"),
        "jobworker-init, all layers": lambda: helper(Network.HOST),
        "jobworker-init, all layers, no network": lambda: helper(Network.NONE),
    }


async def measure(ctx: Context, out: Section) -> None:
    n = max(50, ctx.mode.starts // 5)
    cgroup = ctx.workspace.cgroup / "isolation"
    cgroup.mkdir()
    data = ctx.workspace.root / "isolation-data"
    data.mkdir(mode=0o700)
    try:
        variants = _variants(cgroup, data)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(n + 5):
            for name, start in variants.items():
                t0 = time.perf_counter()
                await start()
                if round_ >= 5:  # warm-up rounds are not counted
                    times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        os.rmdir(cgroup)
    base = percentile(times["spawn /bin/true"], 50)
    shim = percentile(times["cgroup (sh shim)"], 50)
    for name, samples in times.items():
        if name == "spawn /bin/true":
            out.add("spawn /bin/true p50", base, "ms")
            continue
        out.add(f"{name} p50", percentile(samples, 50), "ms", base, "spawn /bin/true")
    out.data = {
        "n": n,
        "p50_ms": {name: percentile(samples, 50) for name, samples in times.items()},
        "over_the_shim_ms": {
            name: percentile(samples, 50) - shim for name, samples in times.items()
        },
    }
