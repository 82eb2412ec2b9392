"""The server in a freshly delegated cgroup, driven by the CLI (the VM tier).

Like systemd with ``Delegate=yes``: the server starts inside a cgroup of its own that holds
it, moves itself into ``server/``, enables the controllers, and puts each job under
``jobs/``. Its limits then bite, as the CLI reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import JOB_PYTHON, JOBWORKER, client_env, free_port, wait_listening

from jobworker.client import Client
from jobworker.worker import JobState, Limits
from jobworker.worker.cgroup import find_cgroup2_mount
from jobworker.worker.process import HELPER_PROCESSES

IN_VM = os.environ.get("JOBWORKER_VM") == "1"
pytestmark = [
    pytest.mark.skipif(not IN_VM, reason="VM tier: runs only inside scripts/vm-run"),
    pytest.mark.anyio,
]


@pytest.fixture(scope="module")
def delegated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, subprocess.Popen[bytes], dict[str, str]]]:
    """A server started inside a fresh cgroup, as a service manager delegates one.

    Started once for the module: Python starts slowly under emulation.
    """
    tmp_path = tmp_path_factory.mktemp("delegated")
    cgroup = find_cgroup2_mount() / f"delegated-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    port = free_port()
    data_dir = tmp_path / "data"
    log = (tmp_path / "serve.log").open("wb")
    env = {**os.environ, "JOBWORKER_STOP_GRACE": "2"}
    # The shim joins the cgroup before exec, as systemd would place the service.
    process = subprocess.Popen(
        [
            "sh",
            "-c",
            'echo 0 > "$0/cgroup.procs" && exec "$@"',
            str(cgroup),
            *JOBWORKER,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        wait_listening(port, process, tmp_path / "serve.log", timeout=120)
        yield cgroup, process, client_env(port, data_dir)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        log.close()
        for leftover in (cgroup / "server", cgroup):
            if leftover.exists():
                leftover.rmdir()


def client(env: dict[str, str]) -> Client:
    host, port = env["JOBWORKER_SERVER"].split(":")
    return Client(
        host,
        int(port),
        cert=env["JOBWORKER_CERT"],
        key=env["JOBWORKER_KEY"],
        ca=env["JOBWORKER_CA"],
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*JOBWORKER, *args], env=env, capture_output=True, timeout=120, check=False
    )


async def test_the_server_takes_over_its_delegated_cgroup(
    delegated: tuple[Path, subprocess.Popen[bytes], dict[str, str]],
) -> None:
    cgroup, server, env = delegated
    assert (cgroup / "server" / "cgroup.procs").read_text().split() == [str(server.pid)]
    assert (cgroup / "cgroup.procs").read_text().split() == [], "no internal processes"
    enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    assert {"memory", "cpu", "io", "pids"} <= enabled
    assert {"memory", "cpu", "io", "pids"} <= set(
        (cgroup / "jobs" / "cgroup.subtree_control").read_text().split()
    )
    async with client(env) as admin:
        job = await admin.start("sleep", ["60"], Limits(memory_bytes=64 << 20, pids=16))
        assert job.unenforced == frozenset()
        job_cgroup = cgroup / "jobs" / job.id
        assert (job_cgroup / "memory.max").read_text().strip() == str(64 << 20)
        assert (job_cgroup / "pids.max").read_text().strip() == str(16 + HELPER_PROCESSES)
        # The job's init and its program; the init's parent is the job's monitor, job.pid.
        init, program = sorted(map(int, (job_cgroup / "cgroup.procs").read_text().split()))
        assert parent_of(init) == job.pid and parent_of(program) == init
        assert (await admin.stop(job.id)).state is JobState.STOPPED
    assert not job_cgroup.exists()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_cli_reports_an_oom_kill(
    delegated: tuple[Path, subprocess.Popen[bytes], dict[str, str]],
) -> None:
    _, _, env = delegated
    hog = f"{JOB_PYTHON} -S -c 'b = bytearray(200 << 20)'"
    ran = cli(env, "run", "--memory", "50M", "--", "sh", "-c", f"exec {hog}")
    assert ran.returncode == 128 + signal.SIGKILL, ran.stderr


async def test_sigterm_stops_limited_jobs_and_removes_their_cgroups(
    delegated: tuple[Path, subprocess.Popen[bytes], dict[str, str]],
) -> None:
    cgroup, server, env = delegated
    async with client(env) as admin:
        for _ in range(3):
            await admin.start("sh", ["-c", "while :; do :; done"], Limits(cpu_millis=100))
        oom = [j for j in await admin.list() if j.oom_killed]
        assert [j.state for j in oom] == [JobState.TERMINATED], "the CLI's job, as reported"
    assert len([p for p in (cgroup / "jobs").iterdir() if p.is_dir()]) == 3
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) == 0
    assert not (cgroup / "jobs").exists()
