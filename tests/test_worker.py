"""The worker library against real processes and the real cgroup2 hierarchy."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import job_cgroups, job_processes, log_files, open_fds, pid_exists, read_all

from jobworker.errors import (
    InvalidCommand,
    InvalidJobId,
    InvalidLimits,
    InvalidOffset,
    JobNotFound,
    LimitNotEnforceable,
    Unavailable,
    WorkerClosed,
)
from jobworker.worker import JobSpec, JobState, Limits, Worker, WorkerConfig
from jobworker.worker.config import OnExit
from jobworker.worker.process import HELPER_PROCESSES

pytestmark = pytest.mark.anyio


async def run(worker: Worker, script: str, owner: str = "alice") -> str:
    status = await worker.start(JobSpec("sh", ("-c", script), owner=owner))
    assert status.state is JobState.RUNNING
    return status.id


async def wait_for_line(worker: Worker, job_id: str, count: int) -> list[str]:
    """Follow the output until it holds ``count`` lines."""
    buf = b""
    async with worker.output(job_id) as stream:
        async for chunk in stream:
            buf += chunk.data
            if buf.count(b"\n") >= count:
                break
    return buf.decode().splitlines()[:count]


# Lifecycle and status.


async def test_exit_code_and_output_of_a_completed_job(worker: Worker) -> None:
    job_id = await run(worker, "echo out; echo err >&2; exit 3")
    assert await read_all(worker, job_id) == b"out\nerr\n"
    status = worker.status(job_id)
    assert status.state is JobState.COMPLETED
    assert (status.exit_code, status.signal, status.oom_killed) == (3, None, False)
    assert status.ended_at is not None and status.ended_at >= status.started_at
    assert status.owner == "alice"
    assert (status.program, status.args) == ("sh", ("-c", "echo out; echo err >&2; exit 3"))
    assert status.usage.cpu_usec is not None and status.usage.cpu_usec > 0
    assert job_cgroups(worker) == [], "the cgroup of an ended job must be removed"


async def test_a_job_killed_by_a_signal_is_terminated(worker: Worker) -> None:
    job_id = await run(worker, "kill -KILL $$")
    await read_all(worker, job_id)
    status = worker.status(job_id)
    assert status.state is JobState.TERMINATED
    assert (status.exit_code, status.signal) == (None, signal.SIGKILL)


async def test_stop_is_sigterm_and_reports_stopped(worker: Worker) -> None:
    job_id = await run(worker, "echo ready; exec sleep 60")
    await wait_for_line(worker, job_id, 1)
    status = await worker.stop(job_id)
    assert status.state is JobState.STOPPED
    assert (status.exit_code, status.signal) == (None, signal.SIGTERM)
    assert not pid_exists(status.pid)
    assert job_cgroups(worker) == []


async def test_stop_escalates_to_kill_after_the_grace_period(
    config: WorkerConfig,
) -> None:
    async with Worker(replace(config, stop_grace=0.3)) as worker:
        job_id = await run(worker, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
        await wait_for_line(worker, job_id, 1)
        with anyio.fail_after(10):
            status = await worker.stop(job_id)
        assert status.state is JobState.STOPPED
        assert status.signal == signal.SIGKILL


async def test_stop_of_an_ended_job_returns_its_final_status(worker: Worker) -> None:
    job_id = await run(worker, "exit 0")
    await read_all(worker, job_id)
    final = worker.status(job_id)
    assert await worker.stop(job_id) == final
    assert final.state is JobState.COMPLETED


async def test_stop_right_after_start_leaves_nothing_running(worker: Worker) -> None:
    """The stop can arrive before the shim joined the cgroup; it must still end the job."""
    for _ in range(20):
        status = await worker.start(JobSpec("sleep", ("60",)))
        with anyio.fail_after(10):
            final = await worker.stop(status.id)
        assert final.state is JobState.STOPPED
        assert not pid_exists(status.pid)
    assert job_cgroups(worker) == []


async def test_list_shows_every_job_or_one_owners(worker: Worker) -> None:
    a = await run(worker, "exit 0", owner="alice")
    b = await run(worker, "exit 0", owner="bob")
    assert [s.id for s in worker.list()] == [a, b]
    assert [s.id for s in worker.list(owner="bob")] == [b]
    assert worker.list(owner="carol") == []


# Containment.


async def test_stop_kills_the_whole_process_tree(worker: Worker) -> None:
    """A background child and a grandchild in a new session: all in the cgroup, all gone."""
    script = (
        "sleep 300 & echo child $! $(cat /proc/$!/cgroup | grep ^0::); "
        "setsid sh -c 'echo grandchild $$ $(grep ^0:: /proc/$$/cgroup); exec sleep 300' & "
        "echo main $$ $(grep ^0:: /proc/$$/cgroup); wait"
    )
    job_id = await run(worker, script)
    lines = await wait_for_line(worker, job_id, 3)
    in_cgroup = job_processes(worker, job_id)
    procs = {}
    for line in lines:
        name, pid, cgroup = line.split()
        # The job's own cgroup is the root of its cgroup namespace.
        assert cgroup == "0::/", f"{name} ran outside the job's cgroup"
        assert int(pid) in in_cgroup, f"{name} is not in the job's cgroup on the host"
        procs[name] = in_cgroup[int(pid)]
    assert set(procs) == {"main", "child", "grandchild"}
    assert all(pid_exists(pid) for pid in procs.values())
    with anyio.fail_after(10):
        status = await worker.stop(job_id)
    assert status.state is JobState.STOPPED
    alive = [name for name, pid in procs.items() if pid_exists(pid)]
    assert alive == [], f"{alive} survived the stop"
    assert job_cgroups(worker) == []


async def test_processes_left_behind_by_the_main_process_are_killed(worker: Worker) -> None:
    job_id = await run(worker, "setsid sleep 300 & echo $!; read never </dev/zero")
    ns_pid = int((await wait_for_line(worker, job_id, 1))[0])
    daemon = job_processes(worker, job_id)[ns_pid]
    assert pid_exists(daemon)
    main = job_processes(worker, job_id)[2]
    os.kill(main, signal.SIGKILL)  # the program dies; its daemon is still there
    await read_all(worker, job_id)
    status = worker.status(job_id)
    assert status.state is JobState.TERMINATED and status.signal == signal.SIGKILL
    assert not pid_exists(daemon), "a daemonized child escaped"
    assert job_cgroups(worker) == []


async def test_leaving_the_worker_stops_jobs_and_removes_cgroups(
    config: WorkerConfig, cgroup_root: Path
) -> None:
    async with Worker(config) as worker:
        ids = [await run(worker, "sleep 300 & sleep 300") for _ in range(3)]
        pids = [worker.status(i).pid for i in ids]
        assert len(job_cgroups(worker)) == 3
    assert not any(pid_exists(p) for p in pids)
    assert [worker.status(i).state for i in ids] == [JobState.STOPPED] * 3
    assert not cgroup_root.exists()
    with pytest.raises(WorkerClosed):
        await worker.start(JobSpec("true"))


async def test_a_running_job_costs_no_task_and_its_end_is_still_seen(worker: Worker) -> None:
    before = len(asyncio.all_tasks())
    ids = [await run(worker, "sleep 300") for _ in range(20)]
    assert len(asyncio.all_tasks()) == before, "a running job kept a task of its own"
    ends = [await run(worker, f"exit {code}") for code in range(3)]
    with anyio.fail_after(30):
        for job_id in ends:
            await read_all(worker, job_id)  # ends once the job has ended
    finals = [worker.status(job_id) for job_id in ends]
    assert [(s.state, s.exit_code) for s in finals] == [(JobState.COMPLETED, c) for c in range(3)]
    for job_id in ids:
        await worker.stop(job_id)
    assert {worker.status(i).state for i in ids} == {JobState.STOPPED}
    assert job_cgroups(worker) == []


async def test_a_worker_that_leaves_its_jobs_running_stops_watching_them(
    config: WorkerConfig, cgroup_root: Path
) -> None:
    before = open_fds()
    async with Worker(replace(config, on_exit=OnExit.KEEP)) as worker:
        ids = [await run(worker, "sleep 300") for _ in range(3)]
        pids = [worker.status(i).pid for i in ids]
    try:
        assert all(pid_exists(p) for p in pids), "a job left to the next server was stopped"
        assert open_fds() <= before, "the worker kept a running job's descriptor"
    finally:
        async with Worker(config):  # adopts them, and stops them as it leaves
            pass
        cgroup_root.rmdir()  # the first worker made it, so the second leaves it
    assert not any(pid_exists(p) for p in pids)


async def test_job_cgroups_left_by_a_dead_worker_are_reaped(
    config: WorkerConfig, cgroup_root: Path
) -> None:
    stale = cgroup_root / "jobs" / "0d6f4f6e-4c8e-4f7b-9d1a-2b3c4d5e6f70"
    stale.mkdir(parents=True)
    proc = await anyio.open_process(
        ["sh", "-c", f"echo 0 > {stale}/cgroup.procs && exec sleep 300"]
    )
    try:
        with anyio.fail_after(5):
            while not (stale / "cgroup.procs").read_text().split():
                await anyio.sleep(0.01)
        async with Worker(config) as worker:
            assert job_cgroups(worker) == []
            with anyio.fail_after(5):
                assert await proc.wait() == -signal.SIGKILL
    finally:
        cgroup_root.rmdir()  # this test made it, so the worker leaves it
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# Output.


async def test_output_follows_a_running_job_live(worker: Worker) -> None:
    job_id = await run(worker, "echo first; read never </dev/zero; sleep 60")
    first = await wait_for_line(worker, job_id, 1)
    assert first == ["first"]
    assert worker.status(job_id).state is JobState.RUNNING
    await worker.stop(job_id)


async def test_output_from_an_offset(worker: Worker) -> None:
    job_id = await run(worker, "printf 0123456789")
    assert await read_all(worker, job_id) == b"0123456789"
    assert await read_all(worker, job_id, 4) == b"456789"
    assert await read_all(worker, job_id, 10) == b""
    with pytest.raises(InvalidOffset, match="past the end"):
        await read_all(worker, job_id, 11)
    with pytest.raises(InvalidOffset, match="negative"):
        await read_all(worker, job_id, -1)


async def test_large_binary_output_is_byte_exact_in_bounded_chunks(
    config: WorkerConfig, readable_dir: Path
) -> None:
    payload = os.urandom(8 * 1024 * 1024 + 17)
    source = readable_dir / "payload.bin"
    source.write_bytes(payload)
    async with Worker(replace(config, chunk_size=100_000)) as worker:
        status = await worker.start(JobSpec("cat", (str(source),)))
        assert await read_all(worker, status.id) == payload


async def test_several_readers_during_a_stop_each_get_every_byte(worker: Worker) -> None:
    job_id = await run(worker, "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.01; done")
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await read_all(worker, job_id))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(reader)
        await wait_for_line(worker, job_id, 10)
        await worker.stop(job_id)
    log = (worker.config.data_dir / "logs" / f"{job_id}.log").read_bytes()
    assert len(results) == 5
    assert all(r == log for r in results)
    assert log.count(b"\n") >= 10


async def test_a_cancelled_reader_releases_its_file_and_watch(worker: Worker) -> None:
    job_id = await run(worker, "echo hello; sleep 60")
    await wait_for_line(worker, job_id, 1)
    before = open_fds()
    watcher = worker._watcher  # the one inotify instance of this worker

    def waiters() -> int:  # on the log: its time recorder's, and any reader's
        return sum(len(watched.waiters) for watched in watcher._by_wd.values())

    watches_before, waiters_before = watcher.watch_count, waiters()
    got_first = anyio.Event()

    async def reader() -> None:
        async with worker.output(job_id) as stream:
            async for _ in stream:
                got_first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await got_first.wait()
        assert waiters() == waiters_before + 1
        tg.cancel_scope.cancel()
    # Only new descriptors count: an earlier test's objects may be collected meanwhile.
    assert open_fds() <= before, "the cancelled reader leaked a file descriptor"
    assert waiters() == waiters_before, "the cancelled reader is still woken by inotify"
    assert watcher.watch_count == watches_before, "the cancelled reader left an inotify watch"
    await worker.stop(job_id)
    assert watcher.watch_count == watches_before - 1, "the job's end released its log's watch"


async def test_the_inotify_descriptor_never_blocks_the_event_loop(worker: Worker) -> None:
    fd = worker._watcher._fd
    assert fd >= 0
    assert not os.get_blocking(fd), "reading it when nothing is queued would hang"


async def test_many_jobs_at_once(worker: Worker) -> None:
    count = 60
    ids = [await run(worker, f"echo job {i}; sleep 0.2") for i in range(count)]
    outputs: dict[str, bytes] = {}

    async def collect(job_id: str) -> None:
        outputs[job_id] = await read_all(worker, job_id)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for job_id in ids:
                tg.start_soon(collect, job_id)
    assert [outputs[j] for j in ids] == [f"job {i}\n".encode() for i in range(count)]
    assert {worker.status(j).state for j in ids} == {JobState.COMPLETED}
    assert job_cgroups(worker) == []
    assert worker._watcher.watch_count == 0


# Bad input: a clear error, and nothing changed.


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (JobSpec(""), InvalidCommand, "must not be empty"),
        (JobSpec("ec\0ho"), InvalidCommand, "NUL"),
        (JobSpec("echo", ("a", "b\0c")), InvalidCommand, "argument 1 .*NUL"),
        (JobSpec("no-such-program-here"), InvalidCommand, "not found on the job.s PATH"),
        (JobSpec("/no/such/program"), InvalidCommand, "not found there .*does not exist"),
        (JobSpec("bin/ls"), InvalidCommand, "absolute path"),
        (JobSpec("/etc"), InvalidCommand, "cannot be run by the job.s user: Permission denied"),
        (JobSpec("{not executable}"), InvalidCommand, "cannot be run by the job.s user: Permiss"),
        (JobSpec("true", limits=Limits(memory_bytes=10)), InvalidLimits, "memory_bytes"),
        (JobSpec("true", limits=Limits(cpu_millis=0)), InvalidLimits, "cpu_millis"),
        (JobSpec("true", limits=Limits(pids=-1)), InvalidLimits, "pids"),
    ],
)
async def test_a_bad_job_spec_is_refused_and_changes_nothing(
    worker: Worker, spec: JobSpec, error: type[Exception], message: str, readable_dir: Path
) -> None:
    if spec.program == "{not executable}":
        plain = readable_dir / "plain-file"  # where the job's user can see it
        plain.write_text("#!/bin/sh\n")
        spec = replace(spec, program=str(plain))
    fds = open_fds(worker)
    with pytest.raises(error, match=message):
        await worker.start(spec)
    assert worker.list() == [], "no job record"
    assert job_cgroups(worker) == [], "no cgroup"
    assert log_files(worker) == [], "no log file"
    assert open_fds(worker) <= fds, "no leaked descriptor"


@pytest.mark.parametrize(
    "job_id",
    [
        "",
        "../../etc/passwd",
        "not-a-uuid",
        "3f2b8c1e7d4a4e6b9c2d1a5f0e9b7c34",  # no hyphens
        "{3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34}",
        "3f2b8c1e-7d4a-1e6b-9c2d-1a5f0e9b7c34",  # version 1
        "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34\n",
    ],
)
async def test_a_malformed_job_id_is_refused(worker: Worker, job_id: str) -> None:
    with pytest.raises(InvalidJobId, match="invalid job id"):
        worker.status(job_id)
    with pytest.raises(InvalidJobId):
        await worker.stop(job_id)
    with pytest.raises(InvalidJobId):
        worker.output(job_id)


async def test_an_unknown_job_id_is_not_found(worker: Worker) -> None:
    unknown = "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"
    with pytest.raises(JobNotFound):
        worker.status(unknown)
    with pytest.raises(JobNotFound):
        await worker.stop(unknown)
    with pytest.raises(JobNotFound):
        worker.output(unknown)


async def test_job_ids_are_accepted_in_either_case(worker: Worker) -> None:
    job_id = await run(worker, "exit 0")
    assert worker.status(job_id.upper()).id == job_id
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id)


async def test_an_explicit_limit_the_host_cannot_enforce_is_refused(worker: Worker) -> None:
    missing = sorted({"memory_bytes", "cpu_millis", "pids"} - worker.enforceable_limits)
    if not missing:
        pytest.skip("every controller is available here")
    valid = {"memory_bytes": 1 << 24, "cpu_millis": 500, "pids": 10}
    option = {"memory_bytes": "--memory", "cpu_millis": "--cpus", "pids": "--pids-limit"}
    # Named as the user wrote it, not by the wire's field name.
    with pytest.raises(LimitNotEnforceable, match=f"cannot enforce {option[missing[0]]}:"):
        await worker.start(JobSpec("true", limits=Limits(**{missing[0]: valid[missing[0]]})))
    assert worker.list() == [] and job_cgroups(worker) == [] and log_files(worker) == []


async def test_default_limits_the_host_cannot_enforce_are_reported(config: WorkerConfig) -> None:
    defaults = Limits(memory_bytes=1 << 30, pids=1000)
    async with Worker(replace(config, default_limits=defaults)) as worker:
        status = await worker.start(JobSpec("true"))
        assert status.limits == defaults
        expected = {"memory_bytes", "pids"} - worker.enforceable_limits
        assert status.unenforced == expected


async def test_limits_above_the_maximum_are_refused(config: WorkerConfig) -> None:
    top = Limits(pids=100)
    async with Worker(replace(config, default_limits=top, max_limits=top)) as worker:
        if "pids" not in worker.enforceable_limits:
            pytest.skip("pids controller not available here")
        with pytest.raises(InvalidLimits, match="maximum"):
            await worker.start(JobSpec("true", limits=Limits(pids=101)))
        assert worker.list() == []


# Limits written to the kernel (their enforcement is proven in the VM tier).


@pytest.mark.needs_controller("memory", "cpu", "pids")
async def test_limits_are_written_to_the_job_cgroup(worker: Worker) -> None:
    limits = Limits(memory_bytes=64 << 20, cpu_millis=250, pids=32)
    status = await worker.start(JobSpec("sleep", ("60",), limits=limits))
    cgroup = worker.cgroup_root / "jobs" / status.id
    assert (cgroup / "memory.max").read_text().strip() == str(64 << 20)
    assert (cgroup / "cpu.max").read_text().split() == ["25000", "100000"]
    # The job's own 32, and its init (worker/process.py).
    assert (cgroup / "pids.max").read_text().strip() == str(32 + HELPER_PROCESSES)
    assert status.unenforced == frozenset()
    await worker.stop(status.id)


async def test_a_start_that_fails_on_the_host_rolls_back(worker: Worker) -> None:
    logs = worker.config.data_dir / "logs"
    logs.rmdir()  # the log cannot be created: as if the disk were gone
    try:
        with pytest.raises(Unavailable, match="cannot start a job now"):
            await worker.start(JobSpec("true"))
        assert worker.list() == [], "no job record"
        assert job_cgroups(worker) == [], "no cgroup"
    finally:
        logs.mkdir()


async def test_the_start_warning_names_the_limits_by_their_options(
    config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobworker"):
        async with Worker(config) as worker:
            missing = {"memory_bytes", "cpu_millis", "pids"} - worker.enforceable_limits
    if not missing:
        pytest.skip("every controller is available here")
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be enforced" in r.getMessage()]
    assert "--memory" in warning if "memory_bytes" in missing else "--memory" not in warning
    assert "memory_bytes" not in warning and "cpu_millis" not in warning
