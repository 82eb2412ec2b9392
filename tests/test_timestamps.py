"""When output was written: the time index of each log, and streams that carry its times.

Jobs print their own clock (``date``, the same realtime clock the server reads), so the
assertions are causal, never on how fast anything ran: a line is never stamped before the job
read the clock it printed, nor after the job had ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from helpers import log_files, read_all

from jobworker.models import OutputChunk
from jobworker.worker import JobSpec, JobState, Worker, WorkerConfig
from jobworker.worker.config import OnExit
from jobworker.worker.times import BURST, RATE, TimeIndex

pytestmark = pytest.mark.anyio

# Each line: the job's clock as it writes the line, in seconds since the epoch.
_CLOCK_LINES = "for i in 1 2 3 4; do date +%s.%N; sleep 0.2; done"


async def _chunks(worker: Worker, job_id: str, *, timestamps: bool = True) -> list[OutputChunk]:
    async with worker.output(job_id, timestamps=timestamps) as stream:
        return [chunk async for chunk in stream]


async def _run(worker: Worker, script: str) -> str:
    job = await worker.start(JobSpec("sh", ("-c", script)))
    await read_all(worker, job.id)  # to its end
    final = worker.status(job.id)
    assert final.state is JobState.COMPLETED, final
    return job.id


def _points(worker: Worker, job_id: str) -> list[tuple[int, int]]:
    data = (worker.config.data_dir / "logs" / f"{job_id}.times").read_bytes()
    return list(struct.iter_unpack("<QQ", data))


def _seconds(at: datetime | None) -> float:
    assert at is not None, "a chunk of data without its time"
    return at.timestamp()


async def test_each_line_is_stamped_when_it_was_written(worker: Worker) -> None:
    job_id = await _run(worker, _CLOCK_LINES)
    final = worker.status(job_id)
    chunks = await _chunks(worker, job_id)
    assert b"".join(c.data for c in chunks) == await read_all(worker, job_id), "same bytes"
    # Each write got a point of its own (they were fewer than a burst), so a chunk a line.
    assert [len(c.data.splitlines()) for c in chunks] == [1, 1, 1, 1]
    for chunk in chunks:
        printed = float(chunk.data)
        written = _seconds(chunk.written_at)
        assert written >= printed - 0.001, "stamped before the job wrote it"
        assert final.ended_at is not None and written <= final.ended_at.timestamp()
    stamps = [_seconds(c.written_at) for c in chunks]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4


async def test_live_readers_get_the_same_times_and_plain_readers_none(worker: Worker) -> None:
    job = await worker.start(JobSpec("sh", ("-c", _CLOCK_LINES)))
    live = await _chunks(worker, job.id)  # from the start, following the job to its end
    later = await _chunks(worker, job.id)
    assert [(c.data, c.written_at) for c in live] == [(c.data, c.written_at) for c in later]
    plain = await _chunks(worker, job.id, timestamps=False)
    assert len(plain) == 1 and plain[0].written_at is None, "no stamp, no split unasked"


async def test_a_reader_ahead_of_the_index_has_a_point_taken_for_it(worker: Worker) -> None:
    job = await worker.start(JobSpec("sh", ("-c", "echo first; exec sleep 60")))
    log = worker.config.data_dir / "logs" / f"{job.id}.log"
    deadline = time.monotonic() + 10
    # Without giving the event loop a turn: inotify's event for the write is not read yet.
    while log.stat().st_size == 0 and time.monotonic() < deadline:
        pass
    async with worker.output(job.id, timestamps=True) as stream:
        live = await stream.__anext__()
    await worker.stop(job.id)
    later = (await _chunks(worker, job.id))[0]
    assert live.data == later.data == b"first\n"
    assert live.written_at == later.written_at, "the time a live reader saw is the record's"


async def test_a_job_that_writes_constantly_is_recorded_at_a_bounded_rate(
    worker: Worker,
) -> None:
    # A line every 10 ms or so: each write is an inotify event of its own.
    job_id = await _run(worker, "for i in $(seq 150); do echo line $i; sleep 0.01; done")
    final = worker.status(job_id)
    assert final.ended_at is not None
    ran_for = (final.ended_at - final.started_at).total_seconds()
    points = _points(worker, job_id)
    # The bound: a burst, the rate over the run, the start and the end.
    assert len(points) <= BURST + RATE * ran_for + 2, (len(points), ran_for)
    assert points[-1][0] == final.output_bytes, "the last point is the whole output"
    sizes = [size for size, _ in points]
    times = [at for _, at in points]
    assert sizes == sorted(set(sizes)) and times == sorted(times)
    chunks = await _chunks(worker, job_id)
    assert len({c.written_at for c in chunks}) == len(points), "one time per point"
    lines = b"".join(c.data for c in chunks).splitlines()
    assert len(lines) == 150, "every line, whatever the stamps"


async def test_an_adopted_job_keeps_its_times_and_later_output_gets_the_adoption_time(
    config: WorkerConfig, readable_dir: Path
) -> None:
    go = readable_dir / "go"
    script = f"echo before; while [ ! -e {go} ]; do sleep 0.01; done; echo after; sleep 60"
    async with Worker(replace(config, on_exit=OnExit.KEEP)) as first:
        job = await first.start(JobSpec("sh", ("-c", script)))
        async with first.output(job.id, timestamps=True) as stream:
            before = await stream.__anext__()
    go.touch()  # "after" is written while no worker runs
    log = config.data_dir / "logs" / f"{job.id}.log"
    while log.stat().st_size < len(b"before\nafter\n"):
        await anyio.sleep(0.01)
    adopted_at = time.time()
    try:
        async with Worker(config) as second:
            await second.stop(job.id)
            chunks = await _chunks(second, job.id)
    finally:
        with contextlib.suppress(ChildProcessError):
            # The first worker's monitor (this process started it), gone with the job.
            os.waitpid(job.pid, 0)  # noqa: ASYNC222 - a zombie by now: no wait
        assert config.cgroup_root is not None
        config.cgroup_root.rmdir()  # made by the first worker, so the last one leaves it
    assert [c.data for c in chunks] == [b"before\n", b"after\n"]
    assert chunks[0].written_at == before.written_at, "the first server's time is kept"
    assert _seconds(before.written_at) < adopted_at <= _seconds(chunks[1].written_at)


async def test_removing_a_job_removes_its_index_and_a_stray_index_goes_at_start(
    config: WorkerConfig,
) -> None:
    async with Worker(config) as worker:
        job_id = await _run(worker, "echo hi")
        assert log_files(worker) == [f"{job_id}.log", f"{job_id}.times"]
        worker.remove(job_id)
        assert log_files(worker) == [], "no log and no index left"
        stray = config.data_dir / "logs" / "0b1e5a5c-0000-4000-8000-000000000000.times"
        stray.write_bytes(b"\0" * 16)
    async with Worker(config) as worker:
        assert log_files(worker) == [], "the index of a job without a record is removed"


async def test_a_job_whose_times_cannot_be_recorded_runs_and_streams_unstamped(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    await _run(worker, "true")  # so that the next job's id is chosen ahead
    # A directory where the next job's index would go: appending to it fails.
    blocker = worker.config.data_dir / "logs" / f"{worker.prepared_job_id}.times"
    blocker.mkdir()
    try:
        with caplog.at_level(logging.WARNING, "jobworker.worker.times"):
            job_id = await _run(worker, "echo one; echo two")
        assert job_id == blocker.stem
        assert "no longer recording when output is written" in caplog.text
        chunks = await _chunks(worker, job_id)
        assert b"".join(c.data for c in chunks) == b"one\ntwo\n", "the output is whole"
        assert all(c.written_at is None for c in chunks), "no time where none was recorded"
    finally:
        blocker.rmdir()


async def test_a_gap_has_no_time_and_the_data_around_it_has(config: WorkerConfig) -> None:
    async with Worker(config) as worker:
        spec = JobSpec("sh", ("-c", "head -c 64M /dev/zero"), max_output=4 << 20)
        job = await worker.start(spec)
        # To its end first: a live reader may read bytes before they are dropped.
        await _chunks(worker, job.id, timestamps=False)
        chunks = await _chunks(worker, job.id)
    gaps = [c for c in chunks if c.dropped]
    assert gaps and all(c.written_at is None for c in gaps)
    assert all(c.written_at is not None for c in chunks if c.data)


async def test_the_index_reader_skips_a_record_being_written(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    index = tmp_path / "job.times"
    index.write_bytes(struct.pack("<QQ", 5, 100) + struct.pack("<QQ", 9, 200)[:10])
    reader = TimeIndex(log)
    assert reader.point_after(0) == (5, 100)
    assert reader.point_after(5) is None, "half a record is not a point"
    with index.open("ab") as f:
        f.write(struct.pack("<QQ", 9, 200)[10:])
    assert reader.point_after(5) == (9, 200), "read once whole"
    assert reader.point_after(9) is None


async def test_a_reader_holds_a_few_points_of_a_long_index(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    count = 10_000  # points at sizes 10, 20, ...: byte b's point is the next multiple of 10
    (tmp_path / "job.times").write_bytes(
        b"".join(struct.pack("<QQ", 10 * (i + 1), 1000 + i) for i in range(count))
    )
    reader = TimeIndex(log)
    assert reader.point_after(54_321) == (54_330, 1000 + 5432), "found by its offset"
    assert len(reader._points) <= 64, "a reader holds a block, not the index"
    for offset in range(54_330, 100_000, 7):
        size, at = reader.point_after(offset)  # type: ignore[misc]
        assert size == (offset // 10 + 1) * 10 and at == 1000 + offset // 10
        assert len(reader._points) <= 64
    assert reader.point_after(100_000) is None, "past the last point"
