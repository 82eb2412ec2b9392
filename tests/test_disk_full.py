"""A full disk: new jobs refused below the minimum, a job that fills it, records intact.

The data directory is a 4 MiB tmpfs that each test mounts and unmounts.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import pid_exists, read_all

from jobworker.errors import ConfigError, ResourceExhausted
from jobworker.worker import JobSpec, JobState, Worker, WorkerConfig
from jobworker.worker.config import MinFree

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def small_config(config: WorkerConfig, small_disk: Path) -> WorkerConfig:
    return replace(config, data_dir=small_disk / "data")


async def test_below_the_minimum_new_jobs_are_refused_and_running_ones_go_on(
    small_config: WorkerConfig,
) -> None:
    async with Worker(replace(small_config, min_free=MinFree(size=2 * MiB))) as worker:
        first = await worker.start(JobSpec("sh", ("-c", "head -c 2M /dev/zero; exec sleep 60")))
        async with worker.output(first.id) as stream:
            seen = 0
            async for chunk in stream:
                seen += len(chunk.data)
                if seen == 2 * MiB:
                    break
        with pytest.raises(ResourceExhausted, match=r"disk is nearly full: .* --min-free 2M"):
            await worker.start(JobSpec("true"))
        assert [s.id for s in worker.list()] == [first.id], "a refused job leaves no record"
        still = worker.status(first.id)
        assert still.state is JobState.RUNNING and pid_exists(still.pid)
        assert (still.output_bytes, still.output_lost) == (2 * MiB, False)
    percent = MinFree.parse("99%")
    async with Worker(replace(small_config, min_free=percent)) as worker:
        with pytest.raises(ResourceExhausted, match="--min-free 99%"):
            await worker.start(JobSpec("true"))


async def test_a_job_that_fills_the_disk_sees_enospc_and_its_record_says_so(
    small_config: WorkerConfig, readable_dir: Path
) -> None:
    go = readable_dir / "go"
    # It fills the disk only once it is recorded: else its start may fail for want of space.
    script = f"while [ ! -e {go} ]; do sleep 0.01; done; exec head -c 8M /dev/zero"
    async with Worker(small_config) as worker:
        job = await worker.start(JobSpec("sh", ("-c", script)))
        go.touch()
        output = await read_all(worker, job.id)
        final = worker.status(job.id)
        assert (final.state, final.exit_code) == (JobState.COMPLETED, 1), "head saw ENOSPC"
        assert 0 < len(output) < 4 * MiB, "the job could not write all of its output"
        assert final.output_bytes == len(output)
        assert final.output_lost, "status must say that output was lost"
        # The server still serves: status, list, streams.
        assert [s.id for s in worker.list()] == [job.id]
        assert await read_all(worker, job.id, len(output) - 10) == output[-10:]
    db = small_config.data_dir / "jobs.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (small_config.data_dir / "logs" / f"{job.id}.log").unlink()  # room again
    async with Worker(small_config) as worker:
        again = worker.status(job.id)
        assert (again.state, again.output_lost, again.output_bytes) == (
            JobState.COMPLETED,
            True,
            len(output),
        ), "the record written on the full disk must be the final one"
        assert (await worker.start(JobSpec("true"))).state is JobState.RUNNING


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5%", MinFree(percent=5.0)), ("1G", MinFree(size=1 << 30)), ("0", MinFree())],
)
def test_min_free_is_a_size_or_a_percentage(text: str, expected: MinFree) -> None:
    assert MinFree.parse(text) == expected
    assert MinFree.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["lots", "100%", "-5%", "%"])
def test_a_bad_min_free_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="free space"):
        MinFree.parse(text)
