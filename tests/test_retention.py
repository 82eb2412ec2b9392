"""Removing ended jobs: one by one, in bulk, by age and by count, and through the API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import test_api
import test_output_cap_cli
from helpers import JOB_PYTHON, Served, read_all

from jobworker.client import Client
from jobworker.errors import FailedPrecondition, JobNotFound
from jobworker.worker import JobSpec, JobState, JobStatus, Worker, WorkerConfig
from jobworker.worker.workdir import WorkDirs

pytestmark = pytest.mark.anyio

# Fixtures of the API and CLI tests: a server in this process, and a `jobworker serve`.
pki, server, connect = test_api.pki, test_api.server, test_api.connect
cli = test_output_cap_cli.cli


async def ended_job(worker: Worker, script: str = "echo done", owner: str = "alice") -> str:
    status = await worker.start(JobSpec("sh", ("-c", script), owner=owner))
    await read_all(worker, status.id)
    assert worker.status(status.id).state is JobState.COMPLETED
    return status.id


def files_of(config: WorkerConfig, job_id: str) -> list[Path]:
    data = config.data_dir
    paths = [data / "logs" / f"{job_id}.log", data / "exits" / job_id, data / "work" / job_id]
    return [p for p in paths if p.exists()]


async def wait_gone(worker: Worker, job_ids: list[str]) -> None:
    """Wait (woken by the worker's own pruning, at most 30 s) until none of the jobs exist."""
    with anyio.fail_after(30):
        while {s.id for s in worker.list()} & set(job_ids):
            await anyio.sleep(0.01)


async def test_remove_deletes_the_record_log_and_directory_of_an_ended_job(
    worker: Worker,
) -> None:
    job_id = await ended_job(worker)
    assert files_of(worker.config, job_id), "an ended job keeps its log"
    assert worker.remove(job_id).id == job_id
    with pytest.raises(JobNotFound):
        worker.status(job_id)
    assert files_of(worker.config, job_id) == []
    with pytest.raises(JobNotFound):
        worker.remove(job_id)


async def test_a_big_working_directory_is_deleted_off_the_event_loop(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await ended_job(worker, "mkdir -p a/b && for i in $(seq 300); do : > a/b/$i; done")
    threads: list[bool] = []
    delete = WorkDirs.delete

    def recorded(path: Path) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        delete(path)

    monkeypatch.setattr(WorkDirs, "delete", staticmethod(recorded))
    worker.remove(job_id)
    removed = worker.config.data_dir / "removed"
    assert files_of(worker.config, job_id) == [], "moved out of work/ before remove returns"
    with anyio.fail_after(30):
        while list(removed.iterdir()):
            await anyio.sleep(0.01)
    assert threads == [False], "deleted once, in a thread: the event loop never waited on it"


# A job's tree 3,000 directories deep, each with a file and a link out: deeper than Python's
# recursion limit and than the longest path the kernel takes.
_DEEP_TREE = """
import os
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
    open("f", "w").close()
    os.symlink("/etc", "out")
"""


async def test_a_tree_any_depth_a_job_made_is_deleted_and_nothing_outside_it(
    worker: Worker,
) -> None:
    status = await worker.start(JobSpec(JOB_PYTHON, ("-c", _DEEP_TREE), owner="alice"))
    await read_all(worker, status.id)
    assert worker.status(status.id).exit_code == 0
    worker.remove(status.id)
    removed = worker.config.data_dir / "removed"
    with anyio.fail_after(60):
        while list(removed.iterdir()):
            await anyio.sleep(0.05)
    assert Path("/etc/passwd").exists(), "the links out were removed, not followed"
    assert (await ended_job(worker)) in {s.id for s in worker.list()}, "the worker goes on"


async def test_what_an_earlier_server_left_to_delete_is_deleted_at_start(
    config: WorkerConfig,
) -> None:
    left = config.data_dir / "removed" / "job.1234abcd"
    (left / "deep").mkdir(parents=True)
    (left / "deep" / "file").write_text("x")
    async with Worker(config):
        with anyio.fail_after(30):
            while left.exists():
                await anyio.sleep(0.01)


async def test_a_running_job_is_not_removed(worker: Worker) -> None:
    status = await worker.start(JobSpec("sleep", ("60",), owner="alice"))
    with pytest.raises(FailedPrecondition, match="still running: stop it first"):
        worker.remove(status.id)
    assert worker.status(status.id).state is JobState.RUNNING
    assert files_of(worker.config, status.id), "nothing of it may have been removed"
    assert worker.prune() == [], "pruning leaves running jobs alone"
    await worker.stop(status.id)


async def test_a_stream_open_during_removal_reads_to_the_end_and_ends(worker: Worker) -> None:
    job_id = await ended_job(worker, "head -c 1000000 /dev/zero | tr '\\0' x")
    got = bytearray()
    async with worker.output(job_id) as stream:
        async for chunk in stream:
            if not got:
                worker.remove(job_id)
            got += chunk.data
    assert bytes(got) == b"x" * 1_000_000
    with pytest.raises(JobNotFound):
        worker.output(job_id)


async def test_an_idle_follower_reads_the_tail_of_a_job_pruned_as_it_ends(
    config: WorkerConfig,
) -> None:
    """An idle follower holds no descriptor, yet a job removed the moment it ends (kept
    jobs: 0) still gives it every byte: the end reopens the log before anything prunes."""
    async with Worker(replace(config, retain_jobs=0)) as worker:
        status = await worker.start(JobSpec("sh", ("-c", "echo head; exec sleep 60")))
        log = config.data_dir / "logs" / f"{status.id}.log"
        with anyio.fail_after(30):
            async with worker.output(status.id) as stream:
                assert log_holders(log) != [], "the check below cannot see a held log"
                async for chunk in stream:
                    assert chunk.data == b"head\n"
                    break
                await anyio.sleep(0.1)  # the reader has caught up, and would wait now
                with anyio.move_on_after(0.1):
                    await stream.__anext__()
                assert log_holders(log) == [], "an idle follower held the log open"
            final = await worker.stop(status.id)  # pruned as it ends: still its status
            assert final.state is JobState.STOPPED
            pruned = await worker.start(JobSpec("sh", ("-c", "echo head; sleep 0.5; echo tail")))
            got = bytearray()
            async with worker.output(pruned.id) as stream:
                async for chunk in stream:
                    got += chunk.data
        assert bytes(got) == b"head\ntail\n"
        await wait_gone(worker, [pruned.id])


def log_holders(log: Path) -> list[int]:
    """This process's descriptors open on ``log``."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(log):
                held.append(int(fd))
    return held


async def test_pruning_reads_no_running_jobs_cgroup(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's end makes retention prune: with thousands of jobs running, reading each one's
    accounting there would cost seconds per job end."""
    from jobworker.worker.runner import RunningJob

    running = [await worker.start(JobSpec("sleep", ("60",))) for _ in range(3)]
    ended = [await ended_job(worker) for _ in range(2)]
    reads: list[str] = []
    snapshot = RunningJob.snapshot

    def counted(job: RunningJob) -> JobStatus:
        reads.append(job.id)
        return snapshot(job)

    monkeypatch.setattr(RunningJob, "snapshot", counted)
    assert worker.prune(keep=1) == ended[:1]
    assert reads == [], "pruning read the accounting of running jobs"
    assert {s.id for s in worker.list()} == {*(j.id for j in running), ended[1]}
    assert len(reads) == 3, "the check above can see a read"
    for job in running:
        await worker.stop(job.id)


async def test_prune_by_age_and_owner(worker: Worker) -> None:
    alice = [await ended_job(worker) for _ in range(2)]
    bob = await ended_job(worker, owner="bob")
    running = await worker.start(JobSpec("sleep", ("60",), owner="alice"))
    assert worker.prune(older_than=3600) == [], "none ended an hour ago"
    assert worker.prune(owned=lambda status: status.owner == "alice") == alice
    assert [s.id for s in worker.list()] == [bob, running.id]
    await worker.stop(running.id)


async def test_retain_jobs_keeps_only_the_newest_ended_jobs(config: WorkerConfig) -> None:
    async with Worker(replace(config, retain_jobs=2)) as worker:
        ids = [await ended_job(worker) for _ in range(4)]
        await wait_gone(worker, ids[:2])
        assert [s.id for s in worker.list()] == ids[2:]
        assert files_of(config, ids[0]) == []


def _age_record(db: Path, job_id: str, hours: float) -> None:
    """Make a recorded job look as if it ended ``hours`` ago."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (text,) = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        document = json.loads(text)
        document["ended_at"] = (datetime.now(UTC) - timedelta(hours=hours)).isoformat()
        conn.execute("UPDATE jobs SET status = ? WHERE id = ?", (json.dumps(document), job_id))
        conn.commit()


async def test_retain_for_prunes_jobs_older_than_it_at_start_and_as_they_age(
    config: WorkerConfig,
) -> None:
    async with Worker(config) as worker:
        old, young = await ended_job(worker), await ended_job(worker)
    _age_record(config.data_dir / "jobs.db", old, hours=2)
    _age_record(config.data_dir / "jobs.db", young, hours=1)
    async with Worker(replace(config, retain_for=5400)) as worker:  # 1.5 hours
        await wait_gone(worker, [old])
        assert [s.id for s in worker.list()] == [young]
    async with Worker(replace(config, retain_for=0)) as worker:
        fresh = (await worker.start(JobSpec("sh", ("-c", "echo hi"), owner="a"))).id
        assert await read_all(worker, fresh) == b"hi\n", "its output is served until it ends"
        await wait_gone(worker, [young, fresh])
        assert files_of(config, fresh) == []


# Through the API: ownership, the running-job refusal, the audit line.


async def test_users_remove_and_prune_only_their_own_jobs(
    connect: Callable[[str], Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.audit")
    async with connect("alice") as alice, connect("bob") as bob, connect("admin") as admin:
        mine = await alice.start("true")
        theirs = await bob.start("true")
        running = await alice.start("sleep", ["60"])
        for client, job in ((alice, mine), (bob, theirs)):
            await client.wait(job.id)
        with pytest.raises(JobNotFound):
            await bob.remove(mine.id)
        with pytest.raises(FailedPrecondition, match="still running"):
            await alice.remove(running.id)
        assert await bob.prune(older_than=3600) == []
        assert await bob.prune() == [theirs.id]
        assert (await alice.remove(mine.id)).id == mine.id
        assert [j.id for j in await admin.list()] == [running.id]
        await admin.stop(running.id)
        assert await admin.prune() == [running.id]
    lines = [r.getMessage() for r in caplog.records if r.name == "jobworker.audit"]
    assert any(f"rpc=RemoveJob job={mine.id} outcome=ok" in line for line in lines)
    assert any(
        f"rpc=RemoveJob job={running.id} outcome=failed_precondition" in line for line in lines
    )
    assert any("who=bob role=user rpc=PruneJobs job=- outcome=ok" in line for line in lines)


def test_rm_and_prune_on_the_command_line(cli: Served) -> None:
    done = cli("start", "--", "true").stdout.decode().strip()
    running = cli("start", "--", "sleep", "60").stdout.decode().strip()
    assert cli("wait", done).returncode == 0
    refused = cli("rm", running)
    assert refused.returncode == 1
    assert f"job {running} is still running: stop it first".encode() in refused.stderr
    removed = cli("rm", done[:8])
    assert (removed.returncode, removed.stdout.decode()) == (0, f"{done}\n")
    assert cli("prune", "--older-than", "1h").stdout == b""
    assert cli("stop", running).returncode == 0
    assert cli("prune").stdout.decode() == f"{running}\n"
    assert json.loads(cli("list", "--json").stdout) == []
    bad = cli("prune", "--older-than", "soon")
    assert (bad.returncode, bad.stderr.startswith(b"error: --older-than:")) == (1, True)
