"""Jobs outlive the server: durable records, adoption after a restart or a crash, one server
per root. In process (a Worker) and as `jobworker serve` processes that are SIGKILLed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import JOBWORKER, client_env, free_port, job_cgroups, read_all, wait_listening

from jobworker.errors import ConfigError
from jobworker.worker import JobSpec, JobState, JobStatus, Worker, WorkerConfig
from jobworker.worker.config import OnExit

pytestmark = pytest.mark.anyio


def reap(pid: int) -> None:
    """Collect a monitor left by a worker that kept its jobs (this test process started it)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.fixture
def config(config: WorkerConfig) -> Iterator[WorkerConfig]:
    """The test's worker configuration; its cgroup root outlives the first worker, which
    did create it, so the last one does not remove it: the test does, once it is empty."""
    yield config
    assert config.cgroup_root is not None
    with contextlib.suppress(FileNotFoundError):
        config.cgroup_root.rmdir()


async def wait_until_empty(cgroup: Path) -> None:
    with anyio.fail_after(10):
        while "populated 1" in (cgroup / "cgroup.events").read_text():
            await anyio.sleep(0.02)


async def test_records_survive_a_restart_and_ended_output_is_served(config: WorkerConfig) -> None:
    async with Worker(config) as worker:
        done = await worker.start(JobSpec("sh", ("-c", "echo bye; exit 3"), owner="alice"))
        await read_all(worker, done.id)
    async with Worker(config) as worker:
        (status,) = worker.list()
        assert (status.id, status.state, status.exit_code) == (done.id, JobState.COMPLETED, 3)
        assert status.owner == "alice" and status.ended_at is not None
        assert await read_all(worker, done.id) == b"bye\n"
        assert await read_all(worker, done.id, 2) == b"e\n"


async def test_a_kept_job_is_adopted_streamed_and_stopped(config: WorkerConfig) -> None:
    keep = replace(config, on_exit=OnExit.KEEP)
    script = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.02; done"
    async with Worker(keep) as worker:
        started = await worker.start(JobSpec("sh", ("-c", script), owner="alice"))
        async with worker.output(started.id) as stream:
            await stream.__anext__()
    cgroup = config.cgroup_root / "jobs" / started.id if config.cgroup_root else Path()
    assert "populated 1" in (cgroup / "cgroup.events").read_text(), "it still runs"
    try:
        async with Worker(config) as worker:
            status = worker.status(started.id)
            assert (status.state, status.uid, status.pid) == (
                JobState.RUNNING,
                started.uid,
                started.pid,
            )
            # Its output, from an offset, byte-exact, and live.
            seen = b""
            async with worker.output(started.id, 5) as stream:
                async for chunk in stream:
                    assert chunk.offset == 5 + len(seen)
                    seen += chunk.data
                    if len(seen) > 10:
                        break
            assert seen.startswith(b"0\nline 1\n")
            final = await worker.stop(started.id, by="carol")
            assert (final.state, final.signal, final.stopped_by) == (
                JobState.STOPPED,
                signal.SIGTERM,
                "carol",
            )
            whole = await read_all(worker, started.id)
            lines = whole.decode().splitlines()
            assert lines == [f"line {i}" for i in range(len(lines))], "no gap, no repeat"
            assert job_cgroups(worker) == []
    finally:
        reap(started.pid)


async def test_a_job_that_ends_while_no_worker_runs_is_recorded(config: WorkerConfig) -> None:
    async with Worker(replace(config, on_exit=OnExit.KEEP)) as worker:
        started = await worker.start(JobSpec("sh", ("-c", "sleep 0.3; exit 7")))
    assert config.cgroup_root is not None
    await wait_until_empty(config.cgroup_root / "jobs" / started.id)
    reap(started.pid)
    async with Worker(config) as worker:
        status = worker.status(started.id)
        assert (status.state, status.exit_code, status.signal) == (JobState.COMPLETED, 7, None)
        assert job_cgroups(worker) == []


async def kill_while_no_worker_runs(config: WorkerConfig) -> tuple[JobStatus, Path]:
    """A job a worker left running, then killed (cgroup.kill) before the next worker starts;
    its status when it started and its cgroup."""
    async with Worker(replace(config, on_exit=OnExit.KEEP)) as worker:
        started = await worker.start(JobSpec("sleep", ("60",)))
    assert config.cgroup_root is not None
    cgroup = config.cgroup_root / "jobs" / started.id
    (cgroup / "cgroup.kill").write_text("1")
    await wait_until_empty(cgroup)
    reap(started.pid)
    return started, cgroup


async def test_a_job_killed_while_no_worker_runs_has_its_signal(config: WorkerConfig) -> None:
    started, _ = await kill_while_no_worker_runs(config)
    async with Worker(config) as worker:
        status = worker.status(started.id)
        assert (status.state, status.signal) == (JobState.TERMINATED, signal.SIGKILL)


async def test_a_record_whose_job_left_no_trace_is_lost(config: WorkerConfig) -> None:
    started, cgroup = await kill_while_no_worker_runs(config)
    cgroup.rmdir()
    (config.data_dir / "exits" / started.id).unlink()
    async with Worker(config) as worker:
        status = worker.status(started.id)
        assert (status.state, status.exit_code, status.signal) == (JobState.LOST, None, None)
        assert status.ended_at is not None


@pytest.mark.parametrize("shared", ["data", "cgroup"])
async def test_a_second_worker_on_the_same_root_is_refused(
    config: WorkerConfig, tmp_path: Path, shared: str
) -> None:
    other = (
        replace(config, cgroup_root=config.cgroup_root / "other")  # type: ignore[operator]
        if shared == "data"
        else replace(config, data_dir=tmp_path / "other-data")
    )
    async with Worker(config) as worker:
        running = await worker.start(JobSpec("sleep", ("60",)))
        with pytest.raises(ConfigError) as refused:
            async with Worker(other):
                pass
        assert f"another jobworker server (pid {os.getpid()}) already uses the" in str(
            refused.value
        )
        assert worker.status(running.id).state is JobState.RUNNING, "nothing of it was touched"
        assert len(job_cgroups(worker)) == 1


# As processes: a real `jobworker serve`, SIGKILLed and started again.


class Serve:
    """`jobworker serve` on one data directory and cgroup root, restartable."""

    def __init__(self, tmp_path: Path, cgroup_root: Path, *extra: str) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "serve.log"
        self.env = {
            **os.environ,
            "JOBWORKER_LISTEN": f"127.0.0.1:{self.port}",
            "JOBWORKER_DATA_DIR": str(self.data_dir),
            "JOBWORKER_CGROUP_ROOT": str(cgroup_root),
            "JOBWORKER_STOP_GRACE": "2",
        }
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.client_env: dict[str, str] = {}

    def start(self, *extra: str) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [*JOBWORKER, "serve", *self.extra, *extra],
                env=self.env,
                stdout=sink,
                stderr=sink,
            )
        wait_listening(self.port, self.process, self.log)
        self.client_env = client_env(self.port, self.data_dir)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*JOBWORKER, *args], env=self.client_env, capture_output=True, timeout=60, check=False
        )

    def status(self, job_id: str) -> dict[str, object]:
        shown = self.cli("status", "--json", job_id)
        assert shown.returncode == 0, shown.stderr
        result: dict[str, object] = json.loads(shown.stdout)
        return result


@pytest.fixture
def serve(tmp_path: Path, cgroup_root: Path) -> Iterator[Serve]:
    server = Serve(tmp_path, cgroup_root)
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()
        # Created by the first server, so a restarted one leaves it: the test removes it.
        with contextlib.suppress(FileNotFoundError):
            cgroup_root.rmdir()


def test_sigkill_of_the_server_loses_no_job(serve: Serve) -> None:
    serve.start()
    counter = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.02; done"
    running = serve.cli("start", "--", "sh", "-c", counter).stdout.decode().strip()
    ending = serve.cli("start", "--", "sh", "-c", "sleep 1; exit 5").stdout.decode().strip()
    done = serve.cli("start", "--", "sh", "-c", "exit 4").stdout.decode().strip()
    assert serve.cli("wait", done).returncode == 4
    serve.kill()
    time.sleep(1.5)  # the second job ends while no server runs
    serve.start()
    assert serve.status(running)["state"] == "running"
    assert (serve.status(ending)["state"], serve.status(ending)["exit_code"]) == ("completed", 5)
    assert serve.status(done)["exit_code"] == 4
    stopped = serve.cli("stop", "--json", running)
    assert stopped.returncode == 0, stopped.stderr
    final = json.loads(stopped.stdout)
    assert (final["state"], final["signal"]) == ("stopped", signal.SIGTERM)
    whole = serve.cli("stream", running).stdout.decode().splitlines()
    assert whole == [f"line {i}" for i in range(len(whole))], "byte-exact across the crash"
    tail = serve.cli("stream", "--offset", "7", running).stdout
    assert tail == "\n".join(whole).encode()[7:] + b"\n"
    assert serve.stop() == 0


def test_a_stream_reconnects_across_a_restart_byte_exact(serve: Serve) -> None:
    serve.start("--on-exit", "keep")
    script = "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"
    job = serve.cli("start", "--", "sh", "-c", script).stdout.decode().strip()
    with subprocess.Popen(
        [*JOBWORKER, "stream", "--reconnect-for", "30", job],
        env=serve.client_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as streaming:
        assert streaming.stdout is not None
        first = streaming.stdout.readline()  # it is streaming: now the server goes away
        assert serve.stop() == 0  # on-exit keep: the job goes on
        serve.start()
        rest = streaming.stdout.read()  # the same buffered reader: nothing is skipped
        assert streaming.wait(timeout=60) == 0, streaming.stderr
    assert (first + rest).decode().splitlines() == [f"line {i}" for i in range(300)]


def test_a_second_sigterm_ends_the_server_at_once(serve: Serve) -> None:
    serve.env["JOBWORKER_STOP_GRACE"] = "60"
    serve.start()
    stubborn = serve.cli("start", "--", "sh", "-c", "trap '' TERM; echo up; sleep 300")
    job = stubborn.stdout.decode().strip()
    assert serve.cli("logs", job).stdout == b"up\n"
    assert serve.process is not None
    serve.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert serve.process.poll() is None, "still in its 60 s grace"
    began = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(timeout=10) == 1
    assert time.monotonic() - began < 10
    assert "received SIGTERM again" in serve.log.read_text()
    # The job was left to the next server, which adopts it and can stop it.
    serve.env["JOBWORKER_STOP_GRACE"] = "1"
    serve.start()
    assert serve.status(job)["state"] == "running"
    final = json.loads(serve.cli("stop", "--json", job).stdout)
    assert (final["state"], final["signal"]) == ("stopped", signal.SIGKILL)


def test_sigkill_during_starts_leaves_recorded_jobs_or_nothing(
    serve: Serve, cgroup_root: Path
) -> None:
    serve.start()
    starters = [
        subprocess.Popen(
            [*JOBWORKER, "start", "--", "sleep", "300"],
            env=serve.client_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(12)
    ]
    time.sleep(0.3)
    serve.kill()
    for starter in starters:
        starter.communicate(timeout=60)
    serve.start()
    recorded = {job["id"]: job["state"] for job in json.loads(serve.cli("list", "--json").stdout)}
    cgroups = {p.name for p in (cgroup_root / "jobs").iterdir() if p.is_dir()}
    running = {job_id for job_id, state in recorded.items() if state == "running"}
    assert cgroups == running, "every job cgroup has a record; every running record a cgroup"
    assert set(recorded.values()) <= {"running"}
    assert serve.stop() == 0
    assert not (cgroup_root / "jobs").exists()
