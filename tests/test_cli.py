"""The ``jobworker`` command end to end: a real server process and real CLI processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import JOBWORKER, Served, free_port, serving


@pytest.fixture
def served(tmp_path: Path, cgroup_root: Path) -> Iterator[Served]:
    with serving(tmp_path, cgroup_root) as server:
        yield server


def test_start_stream_and_status_json(served: Served) -> None:
    started = served.cli("start", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    assert len(job_id) == 36
    streamed = served.cli("stream", job_id)
    assert (streamed.returncode, streamed.stdout) == (0, b"out\nerr\n")
    assert served.cli("stream", job_id, "--offset", "4").stdout == b"err\n"
    shown = served.cli("status", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert {k: status[k] for k in ("id", "state", "exit_code", "signal", "oom_killed")} == {
        "id": job_id,
        "state": "completed",
        "exit_code": 3,
        "signal": None,
        "oom_killed": False,
    }
    assert (status["owner"], status["command"], status["args"]) == (
        "admin",
        "sh",
        ["-c", "echo out; echo err >&2; exit 3"],
    )
    assert status["started_at"] <= status["ended_at"]
    listed = json.loads(served.cli("list", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]


def test_run_exits_with_the_jobs_exit_code_or_128_plus_signal(served: Served) -> None:
    ran = served.cli("run", "--", "sh", "-c", "printf 'a\\0b'; exit 42")
    assert (ran.returncode, ran.stdout) == (42, b"a\0b")
    killed = served.cli("run", "--", "sh", "-c", "kill -KILL $$")
    assert killed.returncode == 128 + signal.SIGKILL


def test_stop_prints_the_final_status(served: Served) -> None:
    job_id = served.cli("start", "--", "sleep", "60").stdout.decode().strip()
    stopped = served.cli("stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert "state:" in stopped.stdout.decode()
    assert "stopped" in stopped.stdout.decode()


def test_errors_are_one_clear_line_on_stderr(served: Served) -> None:
    for args, needle in [
        (("status", "not-a-job"), "invalid job id"),
        (("status", "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"), "no job"),
        (("start", "--", "no-such-program-here"), "not found"),
        (("start", "--memory", "lots", "--", "true"), "not a size"),
    ]:
        result = served.cli(*args)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1, args
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ")
        assert needle in lines[0]
        assert result.stdout == b""


def test_a_server_that_is_not_there_is_a_clear_error(served: Served) -> None:
    env = {**served.env, "JOBWORKER_SERVER": f"127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [*JOBWORKER, "list"], env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert b"cannot reach the jobworker server" in result.stderr


def test_sigterm_ends_streams_stops_jobs_and_exits(served: Served, cgroup_root: Path) -> None:
    job_id = served.cli("start", "--", "sh", "-c", "echo up; exec sleep 300").stdout.decode()
    follower = subprocess.Popen(
        [*JOBWORKER, "stream", job_id.strip(), "--reconnect-for", "0"],
        env=served.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"up\n"
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=20) == 0  # a bounded exit: grace (2 s) + drain
    _, err = follower.communicate(timeout=10)
    assert follower.returncode == 1
    assert b"shutting down" in err, err
    assert err.count(b"\n") == 1 and err.startswith(b"error: "), err
    assert not cgroup_root.exists(), "job cgroups and the worker's cgroup are removed"
    log = served.log.read_text()
    assert "stopping jobs" in log


# Run a command with SIGINT at its default, as at a terminal (a test runner started in the
# background of a shell may have inherited SIGINT ignored, and exec keeps that).
WITH_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_ctrl_c_leaves_a_stream_quietly_and_the_job_running(served: Served) -> None:
    job_id = served.cli("start", "--", "sh", "-c", "while :; do echo tick; sleep 0.1; done")
    job_id_text = job_id.stdout.decode().strip()
    follower = subprocess.Popen(
        [*WITH_SIGINT, *JOBWORKER, "stream", job_id_text],
        env=served.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"tick\n"
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=20)
    assert (follower.returncode, err) == (130, b"")
    status = json.loads(served.cli("status", job_id_text, "--json").stdout)
    assert status["state"] == "running"


def test_a_user_job_cannot_read_the_servers_keys_or_run_as_root(served: Served) -> None:
    """A `user` certificate must never mean root: its job cannot read the CA key."""
    pki = served.data_dir / "pki"
    issued = served.cli("certs", "issue", str(pki), "--name", "alice", "--role", "user")
    assert issued.returncode == 0, issued.stderr
    alice = {
        **served.env,
        "JOBWORKER_CERT": str(pki / "alice.pem"),
        "JOBWORKER_KEY": str(pki / "alice-key.pem"),
    }
    key = (pki / "client-ca-key.pem").read_text()
    ran = subprocess.run(
        [*JOBWORKER, "run", "--", "sh", "-c", f"id -u; cat {pki}/client-ca-key.pem"],
        env=alice,
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = ran.stdout.decode()
    assert ran.returncode == 1, output
    assert int(output.split()[0]) != 0, "the job ran as root"
    assert "PRIVATE KEY" not in output and key not in output
    assert "No such file or directory" in output, "the data directory is out of its sight"

    refused = subprocess.run(
        [*JOBWORKER, "start", "--user", "root", "--", "id"],
        env=alice,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stderr.decode() == (
        "error: role 'user' may not choose the account a job runs as\n"
    )
    listed = served.cli("list", "--json")
    assert len(json.loads(listed.stdout)) == 1, "the refused start left no job"


def test_env_cwd_and_network_options(served: Served) -> None:
    ran = served.cli(
        "run",
        "--env",
        "GREETING=hello there",
        "-e",
        "EMPTY=",
        "--cwd",
        "/",
        "--network",
        "none",
        "--",
        "sh",
        "-c",
        'echo "$GREETING|$EMPTY|$(pwd)|$(ls /sys/class/net)"',
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == b"hello there||/|lo\n"
    (job,) = json.loads(served.cli("list", "--json").stdout)
    assert (job["env"], job["cwd"], job["network"], job["user"]) == (
        {"GREETING": "hello there", "EMPTY": ""},
        "/",
        "none",
        None,
    )
    assert job["uid"] >= 65536
    bad = served.cli("start", "--env", "NOVALUE", "--", "true")
    assert (bad.returncode, bad.stderr) == (1, b"error: --env takes NAME=VALUE, not 'NOVALUE'\n")


def test_serve_defaults_written_in_the_cli_are_the_librarys() -> None:
    # The CLI writes them out so that client commands need not import the server or worker.
    from jobworker.cli import app
    from jobworker.server.limits import ServerLimits
    from jobworker.worker.config import DEFAULT_JOB_UIDS

    limits = ServerLimits()
    assert limits.max_connections == app._DEFAULT_MAX_CONNECTIONS
    assert limits.max_connections_per_peer == app._DEFAULT_MAX_CONNECTIONS_PER_PEER
    assert "{}-{}".format(*DEFAULT_JOB_UIDS) == app._DEFAULT_JOB_UIDS
