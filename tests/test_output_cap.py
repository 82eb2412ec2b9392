"""Output caps on a real worker: the head and the tail kept, the middle dropped, never zeros.

The jobs write a pattern whose every 8-byte word holds its own offset, so every byte a
reader gets can be checked against where it claims to be. ``JOBWORKER_FULL_OUTPUT=1`` makes
the fast writer write 4 GiB instead of 512 MiB.
"""

from __future__ import annotations

import array
import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from helpers import JOB_PYTHON

from jobworker.errors import InvalidLimits
from jobworker.worker import JobSpec, JobState, JobStatus, Worker, WorkerConfig
from jobworker.worker.config import OnExit

pytestmark = pytest.mark.anyio

MiB = 1 << 20
FULL = os.environ.get("JOBWORKER_FULL_OUTPUT") == "1"

# Writes argv[1] bytes of the pattern to stdout, 1 MiB at a time, as fast as it can.
WRITER = """
import array, os, sys
total = int(sys.argv[1])
for base in range(0, total, 1 << 20):
    os.write(1, array.array("Q", range(base, base + (1 << 20), 8)).tobytes())
"""


def pattern(offset: int, length: int) -> bytes:
    """The bytes of the pattern at ``offset``."""
    start = offset - offset % 8
    words = array.array("Q", range(start, offset + length + 8, 8)).tobytes()
    return words[offset - start : offset - start + length]


@dataclass
class Followed:
    """What a reader got: data ranges (checked against the pattern) and gaps."""

    data: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    end: int = 0


async def follow(worker: Worker, job_id: str, offset: int = 0) -> Followed:
    """Read the whole output from ``offset``, checking every byte and the order of chunks."""
    seen = Followed(end=offset)
    async with worker.output(job_id, offset) as stream:
        async for chunk in stream:
            assert chunk.offset == seen.end, "chunks must be contiguous"
            if chunk.dropped:
                assert chunk.data == b"", "a gap carries no data"
                seen.gaps.append((chunk.offset, chunk.end))
            else:
                assert chunk.data, "a data chunk is never empty"
                assert chunk.data == pattern(chunk.offset, len(chunk.data)), (
                    f"wrong bytes at {chunk.offset}: dropped bytes must never come back as zeros"
                )
                if seen.data and seen.data[-1][1] == chunk.offset:
                    seen.data[-1] = (seen.data[-1][0], chunk.end)
                else:
                    seen.data.append((chunk.offset, chunk.end))
            seen.end = chunk.end
    return seen


async def start_writer(worker: Worker, total: int, max_output: int | None) -> str:
    spec = JobSpec(JOB_PYTHON, ("-c", WRITER, str(total)), owner="alice", max_output=max_output)
    status = await worker.start(spec)
    assert status.max_output == max_output
    return status.id


async def test_a_fast_writer_keeps_head_and_tail_within_its_cap_byte_exact(
    worker: Worker,
) -> None:
    total = (4 << 30) if FULL else (512 * MiB)
    cap = 64 * MiB
    job_id = await start_writer(worker, total, cap)
    live = await follow(worker, job_id)

    final = worker.status(job_id)
    assert (final.state, final.exit_code) == (JobState.COMPLETED, 0), "the job must not be hurt"
    assert final.output_bytes == total
    log = worker.config.data_dir / "logs" / f"{job_id}.log"
    assert log.stat().st_size == total, "offsets are absolute: the size stays"
    on_disk = log.stat().st_blocks * 512
    assert on_disk <= cap + worker.config.chunk_size, f"{on_disk} bytes on disk"
    head, resume = cap // 2, cap // 2 + final.output_dropped
    assert total - resume <= cap - head, "the tail kept is within the other half of the cap"

    # A reader after the end: the whole head, one gap with the exact range, the whole tail.
    after = await follow(worker, job_id)
    assert after.data == [(0, head), (resume, total)]
    assert after.gaps == [(head, resume)]

    # The live reader got every byte in order and lost nothing outside the dropped range.
    assert live.end == total
    assert live.data[0] == (0, head) or live.data[0][1] >= head
    assert all(head <= start < end <= resume for start, end in live.gaps)
    assert live.data[-1][1] == total


async def test_a_reader_that_starts_in_the_dropped_range_gets_a_gap_first(
    worker: Worker,
) -> None:
    job_id = await start_writer(worker, 8 * MiB, 2 * MiB)
    await follow(worker, job_id)
    dropped = worker.status(job_id).output_dropped
    assert dropped > 0
    seen = await follow(worker, job_id, MiB + 100)
    assert seen.gaps == [(MiB + 100, MiB + dropped)]
    assert seen.data == [(MiB + dropped, 8 * MiB)]


async def test_output_below_the_cap_is_whole_and_counted(worker: Worker) -> None:
    job_id = await start_writer(worker, 3 * MiB, 4 * MiB)
    seen = await follow(worker, job_id)
    assert (seen.data, seen.gaps) == ([(0, 3 * MiB)], [])
    status = worker.status(job_id)
    assert (status.output_bytes, status.output_dropped) == (3 * MiB, 0)


async def test_a_job_without_a_cap_is_counted_and_never_trimmed(worker: Worker) -> None:
    job_id = await start_writer(worker, 5 * MiB, None)
    seen = await follow(worker, job_id)
    assert (seen.data, seen.gaps) == ([(0, 5 * MiB)], [])
    status: JobStatus = worker.status(job_id)
    assert (status.max_output, status.output_bytes, status.output_dropped) == (None, 5 * MiB, 0)


async def test_the_server_default_and_maximum_apply(config: WorkerConfig) -> None:
    bounded = replace(config, default_max_output=2 * MiB, max_max_output=8 * MiB)
    async with Worker(bounded) as worker:
        assert (await worker.start(JobSpec("true", owner="a"))).max_output == 2 * MiB
        spec = JobSpec("true", owner="a", max_output=8 * MiB)
        assert (await worker.start(spec)).max_output == 8 * MiB
        with pytest.raises(InvalidLimits, match="max_output 9M is above this worker's maximum 8M"):
            await worker.start(replace(spec, max_output=9 * MiB))
        assert len(worker.list()) == 2, "a refused job must leave no record"
    only_max = replace(config, max_max_output=4 * MiB)
    async with Worker(only_max) as worker:
        assert (await worker.start(JobSpec("true", owner="a"))).max_output == 4 * MiB


async def test_a_cap_below_one_mebibyte_is_refused(worker: Worker) -> None:
    with pytest.raises(InvalidLimits, match="max_output must be an integer from 1048576"):
        await worker.start(JobSpec("true", owner="a", max_output=MiB - 1))
    assert worker.list() == []


async def test_a_later_worker_goes_on_trimming_an_adopted_job(
    config: WorkerConfig, readable_dir: Path
) -> None:
    go = readable_dir / "go"
    # 6 MiB, then (once the test says so) 6 MiB more, all of one pattern.
    script = WRITER.replace(
        "for base in range(0, total, 1 << 20):",
        f"import pathlib, time\n"
        f"for base in range(0, total, 1 << 20):\n"
        f"    while base == total // 2 and not pathlib.Path({str(go)!r}).exists():\n"
        f"        time.sleep(0.01)",
    )
    total, cap = 12 * MiB, 2 * MiB
    async with Worker(replace(config, on_exit=OnExit.KEEP)) as worker:
        spec = JobSpec(JOB_PYTHON, ("-c", script, str(total)), owner="a", max_output=cap)
        job_id = (await worker.start(spec)).id
        async with worker.output(job_id) as stream:
            async for chunk in stream:
                if chunk.end >= total // 2:
                    break
        first_drop = worker.status(job_id).output_dropped
        assert first_drop > 0
    try:
        await _finish_adopted(config, go, job_id, total, cap, first_drop)
    finally:
        # Created by the first worker, so the second one leaves it: the test removes it.
        assert config.cgroup_root is not None
        with contextlib.suppress(FileNotFoundError):
            config.cgroup_root.rmdir()


async def _finish_adopted(
    config: WorkerConfig, go: Path, job_id: str, total: int, cap: int, first_drop: int
) -> None:
    async with Worker(config) as worker:
        go.touch()
        live = await follow(worker, job_id)
        assert live.end == total
        after = await follow(worker, job_id)
        final = worker.status(job_id)
        assert (final.state, final.output_bytes) == (JobState.COMPLETED, total)
        assert final.output_dropped > first_drop, "the new worker dropped more"
        head, resume = MiB, MiB + final.output_dropped
        assert after.data == [(0, head), (resume, total)]
        assert after.gaps == [(head, resume)]
        log = config.data_dir / "logs" / f"{job_id}.log"
        assert log.stat().st_blocks * 512 <= cap + config.chunk_size
