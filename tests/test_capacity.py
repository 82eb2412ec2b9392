"""What bounds the number of concurrent jobs, as the server reads it at start."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import pytest

from jobworker.server.capacity import EXPECTED_JOBS, Bound, _own_pids_max, bounds, check


def test_the_bounds_are_this_hosts_limits() -> None:
    found = {bound.name: bound for bound in bounds()}
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert found["open files"].limit == soft
    assert found["open files"].per_job == 1, "a job's pidfd; an idle follower holds none"
    watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    assert found["inotify watches"].limit == watches
    assert found["process ids"].limit == int(Path("/proc/sys/kernel/pid_max").read_text())
    assert found["process ids"].per_job == 3, "a job's monitor, init and program"


def test_a_tight_bound_is_named_with_what_to_raise(caplog: pytest.LogCaptureFixture) -> None:
    found = [
        Bound("open files", 1024, 2, 256, "ulimit -n"),
        Bound("process ids", 4_194_304, 3, 1024, "sysctl kernel.pid_max"),
    ]
    with caplog.at_level(logging.INFO, logger="jobworker"):
        assert check(found) == 384
    info, warning = caplog.records
    assert "allows about 384 concurrent jobs" in info.getMessage()
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert text.startswith("open files (1024) allow only about 384 concurrent jobs")
    assert f"for {EXPECTED_JOBS}, raise it to {EXPECTED_JOBS * 2 + 256} or more" in text
    assert "ulimit -n" in text and "pid_max" not in text, "only the bounds that bind"


def test_the_smallest_pids_max_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    # The file formats only (a fake tree): /proc/PID/cgroup lines, and pids.max values.
    mounts = tmp_path / "cgroup"
    service = mounts / "unified" / "system.slice" / "jobworker.service"
    service.mkdir(parents=True)
    (service / "pids.max").write_text("max\n")
    (service.parent / "pids.max").write_text("5000\n")
    v1 = mounts / "pids" / "system.slice" / "jobworker.service"
    v1.mkdir(parents=True)
    (v1 / "pids.max").write_text("4915\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/system.slice/jobworker.service\n")
    assert _own_pids_max(proc, mounts) == 5000, "the parent's, as the service's is max"
    proc.write_text("8:pids:/system.slice/jobworker.service\n0::/system.slice/jobworker.service\n")
    assert _own_pids_max(proc, mounts) == 4915
    proc.write_text("garbage\n1:name=systemd:/\n0::/\n")
    assert _own_pids_max(proc, mounts) is None, "no limit set, and malformed lines ignored"
