"""Resource limits, proven on a real cgroup v2 kernel (the VM tier).

Each test asserts what the kernel reports (memory.events, pids.events, cpu.stat, measured
I/O rates), not only that a file was written. They run inside ``scripts/vm-run`` (``nox -s
vm``); on a host without the controllers they skip, and inside the VM they fail instead.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import JOB_PYTHON, job_cgroups, job_processes, pid_exists, read_all

from jobworker.worker import JobSpec, JobState, Limits, Worker, WorkerConfig
from jobworker.worker.process import HELPER_PROCESSES

pytestmark = pytest.mark.anyio

PYTHON = JOB_PYTHON


def allocate(megabytes: int) -> JobSpec:
    """A job that touches ``megabytes`` of memory, then exits 0."""
    code = f"b = bytearray({megabytes} << 20); print('allocated', len(b) >> 20)"
    return JobSpec(PYTHON, ("-S", "-c", code))


def cgroup_keyed(worker: Worker, job_id: str, name: str) -> dict[str, int]:
    text = (worker.cgroup_root / "jobs" / job_id / name).read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


@pytest.mark.needs_controller("memory")
async def test_a_job_over_its_memory_limit_is_oom_killed(worker: Worker) -> None:
    spec = replace(allocate(200), limits=Limits(memory_bytes=50 << 20))
    status = await worker.start(spec)
    output = await read_all(worker, status.id)
    final = worker.status(status.id)
    assert final.state is JobState.TERMINATED, output
    assert final.signal == signal.SIGKILL
    assert final.oom_killed
    assert b"allocated" not in output
    assert final.usage.memory_peak_bytes is not None
    assert final.usage.memory_peak_bytes <= 50 << 20


@pytest.mark.needs_controller("memory")
async def test_a_job_under_its_memory_limit_completes(worker: Worker) -> None:
    spec = replace(allocate(20), limits=Limits(memory_bytes=128 << 20))
    status = await worker.start(spec)
    assert await read_all(worker, status.id) == b"allocated 20\n"
    final = worker.status(status.id)
    assert (final.state, final.exit_code, final.oom_killed) == (JobState.COMPLETED, 0, False)
    assert final.usage.memory_peak_bytes is not None
    assert final.usage.memory_peak_bytes >= 20 << 20


FORK_BOMB = """
import os, time
children = refused = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    children += 1
print(children, refused, flush=True)
time.sleep(300)
"""


@pytest.mark.needs_controller("pids")
async def test_a_fork_bomb_is_contained_by_pids_max(worker: Worker) -> None:
    bombed = await worker.start(JobSpec(PYTHON, ("-S", "-c", FORK_BOMB), limits=Limits(pids=10)))
    bystander = await worker.start(JobSpec("sh", ("-c", "sleep 0.5; echo fine")))
    async with worker.output(bombed.id) as stream:
        line = (await stream.__anext__()).data
    children, refused = map(int, line.split())
    assert children <= 9, "pids.max counts the job's first process too"
    assert refused == 40 - children
    # pids.max is the job's 10 plus its init (worker/process.py).
    pids_current = worker.cgroup_root / "jobs" / bombed.id / "pids.current"
    assert int(pids_current.read_text()) <= 10 + HELPER_PROCESSES
    assert cgroup_keyed(worker, bombed.id, "pids.events")["max"] >= refused
    assert await read_all(worker, bystander.id) == b"fine\n", "other jobs are unaffected"
    assert worker.status(bystander.id).exit_code == 0
    final = await worker.stop(bombed.id)
    assert final.state is JobState.STOPPED
    assert job_cgroups(worker) == []


@pytest.mark.needs_controller("cpu")
async def test_a_busy_loop_gets_only_its_cpu_share(worker: Worker) -> None:
    status = await worker.start(
        JobSpec("sh", ("-c", "while :; do :; done"), limits=Limits(cpu_millis=200))
    )
    began = time.monotonic()
    await anyio.sleep(3)
    stat = cgroup_keyed(worker, status.id, "cpu.stat")
    wall_usec = (time.monotonic() - began) * 1e6
    await worker.stop(status.id)
    share = stat["usage_usec"] / wall_usec
    # Unlimited, the loop would use a whole CPU (share ~1.0); limited, about 0.2.
    assert 0.1 < share < 0.35, f"the job used {share:.2f} CPU"
    assert stat["nr_throttled"] > 0


def measure_rate(output: bytes) -> float:
    """Bytes per second from dd's summary line."""
    line = next(ln for ln in output.decode().splitlines() if "copied" in ln)
    count = int(line.split()[0])
    seconds = float(line.split(",")[-2].split()[0])
    return count / seconds


@pytest.mark.needs_controller("io")
@pytest.mark.parametrize("direction", ["write", "read"])
async def test_io_max_limits_direct_io_on_the_disk(config: WorkerConfig, direction: str) -> None:
    disk = os.environ.get("JOBWORKER_VM_DISK")
    device = os.environ.get("JOBWORKER_VM_DISK_DEV")
    if not disk or not device:
        pytest.fail("the VM tier runs with --disk (JOBWORKER_VM_DISK, JOBWORKER_VM_DISK_DEV)")
    target = Path(disk) / f"io-{direction}.bin"
    if direction == "read":
        target.write_bytes(os.urandom(4 << 20))
        os.sync()
        command = f"dd if={target} of=/dev/null bs=256k count=12 iflag=direct 2>&1"
        limits = Limits(io_read_bps=1 << 20)
    else:
        # The job runs as a uid of its own: give it a file it may write.
        target.touch()
        target.chmod(0o666)
        command = f"dd if=/dev/zero of={target} bs=256k count=12 oflag=direct 2>&1"
        limits = Limits(io_write_bps=1 << 20)
    async with Worker(replace(config, io_device=device)) as worker:
        status = await worker.start(JobSpec("sh", ("-c", command), limits=limits))
        output = await read_all(worker, status.id)
        assert worker.status(status.id).exit_code == 0, output
    rate = measure_rate(output)
    # 3 MiB at 1 MiB/s: about 1 MiB/s; unlimited, a virtio disk does tens of MiB/s.
    assert 0.6 * (1 << 20) < rate < 1.6 * (1 << 20), f"{direction} ran at {rate / 2**20:.2f} MiB/s"
    target.unlink(missing_ok=True)


@pytest.mark.needs_controller("memory", "pids")
async def test_stop_cleans_up_a_limited_job_tree(worker: Worker) -> None:
    script = "sleep 300 & setsid sleep 300 & echo $!; wait"
    status = await worker.start(
        JobSpec("sh", ("-c", script), limits=Limits(memory_bytes=64 << 20, pids=20))
    )
    async with worker.output(status.id) as stream:
        first = await stream.__anext__()
    grandchild = job_processes(worker, status.id)[int(first.data.split()[0])]
    assert pid_exists(grandchild)
    final = await worker.stop(status.id)
    assert final.state is JobState.STOPPED
    assert not pid_exists(grandchild)
    assert job_cgroups(worker) == []
