"""What the CLI prints for people: local times with ages, signal names, limits as options."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta

import pytest

from jobworker.cli.render import (
    LineStamper,
    duration_text,
    limits_text,
    local_time,
    signal_name,
    stamp,
    status_json,
    status_lines,
    status_table,
    unique_prefix_length,
)
from jobworker.models import JobState, JobStatus, Limits, Usage

STARTED = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)


def lines(status: JobStatus, now: datetime) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in status_lines(status, now))
    return {key: value.strip() for key, value in pairs}


def test_limits_are_written_as_the_options_take_them() -> None:
    limits = Limits(memory_bytes=256 << 20, cpu_millis=500, pids=100, io_write_bps=10 << 20)
    assert limits_text(limits) == "memory=256M cpus=0.5 pids-limit=100 io-write-bps=10M"
    assert limits_text(Limits(cpu_millis=2000), frozenset({"cpu_millis"})) == (
        "cpus=2 (not enforced)"
    )
    assert limits_text(Limits()) == "none"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0123, "12 ms"), (12.34, "12.3 s"), (245, "4m05s"), (7620, "2h07m"), (273600, "3d04h")],
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_signals_have_their_names() -> None:
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(200) == "signal 200"


def test_status_lines_show_age_run_time_signal_and_sizes() -> None:
    status = JobStatus(
        id="3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34",
        state=JobState.STOPPED,
        owner="alice",
        program="sleep",
        args=("60",),
        pid=42,
        started_at=STARTED,
        ended_at=STARTED + timedelta(seconds=75),
        signal=signal.SIGTERM,
        limits=Limits(memory_bytes=64 << 20),
        usage=Usage(cpu_usec=1_500_000, memory_peak_bytes=3 << 20),
        stopped_by="admin",
    )
    shown = lines(status, now=STARTED + timedelta(minutes=10))
    assert shown["result"] == "SIGTERM"
    assert shown["started"] == f"{local_time(STARTED)} (10m00s ago)"
    assert shown["ended"].endswith("(ran 1m15s)")
    assert shown["limits"] == "memory=64M"
    assert (shown["cpu time"], shown["peak memory"]) == ("1.5 s", "3.0 MiB")
    assert shown["stopped by"] == "admin"
    # JSON stays for programs: UTC, base units, numbers.
    document = status_json(status)
    assert document["started_at"] == "2026-11-29T09:30:00+00:00"
    assert (document["signal"], document["limits"]) == (15, {"memory_bytes": 64 << 20})


def test_the_table_has_short_ids_ages_run_times_and_cut_commands() -> None:
    long_args = tuple(f"argument-{i}" for i in range(10))
    running = JobStatus(
        id="3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34",
        state=JobState.RUNNING,
        owner="alice",
        program="sleep",
        args=long_args,
        pid=42,
        started_at=STARTED,
    )
    ended = JobStatus(
        id="9a0b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34",
        state=JobState.COMPLETED,
        owner="bob",
        program="true",
        args=(),
        pid=43,
        started_at=STARTED,
        ended_at=STARTED + timedelta(seconds=75),
        exit_code=0,
    )
    now = STARTED + timedelta(minutes=10)
    header, first, second = status_table([running, ended], now=now)
    assert header.split() == ["ID", "STATE", "RESULT", "OWNER", "AGE", "DURATION", "COMMAND"]
    assert first.split()[:6] == ["3f2b8c1e", "running", "-", "alice", "10m00s", "10m00s"]
    assert first.endswith("…") and "argument-9" not in first
    assert second.split() == [
        "9a0b8c1e",
        "completed",
        "exit",
        "0",
        "bob",
        "10m00s",
        "1m15s",
        "true",
    ]
    whole = status_table([running], now=now, truncate=False)[1]
    assert running.id in whole and whole.endswith("argument-9")


def test_short_ids_grow_until_they_tell_the_jobs_apart() -> None:
    ids = ["3f2b8c1e-7d4a-0000", "3f2b8c1e-7d4b-0000", "9a0b8c1e-0000-0000"]
    assert unique_prefix_length(ids) == 13, "two share 12 characters"
    assert unique_prefix_length(ids[1:]) == 8, "8 at least"
    assert unique_prefix_length([]) == 8


def test_each_line_gets_the_time_of_the_chunk_it_begins_in() -> None:
    first = datetime(2026, 11, 29, 16, 0, 0, 123000, tzinfo=UTC)
    second = datetime(2026, 11, 29, 16, 0, 1, tzinfo=UTC)
    stamper = LineStamper()
    out = stamper(b"one\ntw", first) + stamper(b"o\n\nthree", second) + stamper(b"!", None)
    a, b = stamp(first).decode(), stamp(second).decode()
    unknown = stamp(None).decode()
    assert out.decode().split("\n") == [f"{a}one", f"{a}two", f"{b}", f"{b}three!"]
    assert len(unknown) == len(a) and unknown.strip() == "-", "no time: a dash, as wide"
    assert a == first.astimezone().isoformat(timespec="milliseconds") + " "
    assert stamper(b"", second) == b"", "nothing to stamp"
    assert LineStamper()(b"x\n", None) == stamp(None) + b"x\n"
