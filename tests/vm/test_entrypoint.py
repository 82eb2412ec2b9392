"""``jobworker serve`` as a container's entrypoint, started the way a runtime starts one (VM tier).

A runtime (runc, crun) creates a cgroup for the container, enables the controllers above it,
puts the container's first process there and gives it new cgroup, mount and PID namespaces,
with a fresh cgroup2 mount at /sys/fs/cgroup. Here ``unshare --cgroup --mount --pid --fork``
does the same: inside, the server is PID 1 and its cgroup is the namespace's root ``/``, which
holds a process (the server itself). Everything is checked from outside, as the VM sees it,
and through the real API with the PKI the server creates in its data directory.

These tests run only inside the VM (``nox -s vm``); there a missing tool is a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from helpers import JOB_PYTHON, JOBWORKER, free_port, proc_stat, wait_listening

from jobworker.certs import PkiPaths
from jobworker.client import Client
from jobworker.errors import FailedPrecondition
from jobworker.worker import JobState, JobStatus, Limits
from jobworker.worker.process import HELPER_PROCESSES

IN_VM = os.environ.get("JOBWORKER_VM") == "1"
pytestmark = [
    pytest.mark.skipif(not IN_VM, reason="VM tier: runs only inside scripts/vm-run"),
    pytest.mark.anyio,
]

CGROUP = Path("/sys/fs/cgroup")
UNSHARE = "/usr/bin/unshare"  # util-linux (busybox's has no --cgroup)
CONTROLLERS = {"cpu", "io", "memory", "pids"}

# The container's view, set up before the entrypoint runs: a fresh cgroup2 mount for the new
# cgroup namespace (optionally read-only, as docker mounts it without --privileged); then wait
# until the runtime has taken its own process out of the container's cgroup; then exec.
INSIDE = """
umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup || exit 90
if [ "$CONTAINER_CGROUP_RO" = 1 ]; then mount -o remount,bind,ro /sys/fs/cgroup || exit 91; fi
read -r go || exit 92
exec "$@"
"""


def pids_in(procs: Path) -> list[int]:
    return [int(pid) for pid in procs.read_text().split()]


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def children_of(parent: int) -> dict[int, str]:
    """pid -> state of every child of ``parent``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) and stat[1] == parent:
            out[int(entry)] = stat[0]
    return out


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(condition: Callable[[], object], what: str) -> None:
    with anyio.move_on_after(30):
        while not condition():
            await anyio.sleep(0.02)
        return
    pytest.fail(f"timed out after 30 s waiting for {what}")


@dataclass
class Container:
    cgroup: Path  # the container's cgroup, as the VM sees it; "/" inside
    runtime: subprocess.Popen[bytes]  # unshare: outside the namespaces, waits for PID 1
    pid: int  # the server (PID 1 inside), as the VM sees it
    port: int
    data_dir: Path
    log: Path

    def client(self) -> Client:
        pki = PkiPaths.in_dir(self.data_dir / "pki")
        return Client(
            "127.0.0.1", self.port, cert=pki.admin_cert, key=pki.admin_key, ca=pki.server_ca
        )

    def log_text(self) -> str:
        return self.log.read_text()

    def job_cgroup(self, job_id: str) -> Path:
        return self.cgroup / "jobs" / job_id

    def zombies(self) -> list[int]:
        return [pid for pid, state in children_of(self.pid).items() if state == "Z"]


def _remove_cgroup_tree(path: Path) -> None:
    if not path.exists():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            (sub / "cgroup.kill").write_text("1")
        wait_until(lambda sub=sub: _rmdir_ok(sub), f"removing {sub}", timeout=10)
    wait_until(lambda: _rmdir_ok(path), f"removing {path}", timeout=10)


def _rmdir_ok(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def container(
    tmp_path: Path,
    settings: dict[str, str],
    *,
    read_only: bool = False,
    runtime_stays: bool = False,
) -> Iterator[tuple[Path, subprocess.Popen[bytes], int, Path]]:
    """Start ``jobworker serve`` as PID 1 of new cgroup, mount and PID namespaces.

    ``settings`` are the server's JOBWORKER_* environment variables, as a container engine
    passes them. Yields (cgroup, runtime process, server pid, log). With ``runtime_stays``
    the unshare process is left in the container's cgroup (a runtime that does not move its
    own process out), so the namespace root holds a process that is not the server's.
    """
    assert Path(UNSHARE).exists(), f"{UNSHARE} (util-linux) is needed"
    for name in CONTROLLERS:  # enable from the root, as a runtime's parent cgroup does
        (CGROUP / "cgroup.subtree_control").write_text(f"+{name}")
    cgroup = CGROUP / f"ctr-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    script = tmp_path / "inside.sh"
    script.write_text(INSIDE)
    log = tmp_path / "serve.log"
    join_cgroup = ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(cgroup / "cgroup.procs")]
    unshare = [UNSHARE, "--cgroup", "--mount", "--pid", "--fork", "--mount-proc"]
    serve = [*JOBWORKER, "serve"]
    env = {**os.environ, **settings, "CONTAINER_CGROUP_RO": "1" if read_only else "0"}
    with log.open("wb") as sink:
        runtime = subprocess.Popen(
            [*join_cgroup, *unshare, "/bin/sh", str(script), *serve],
            env=env,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=sink,
        )
    try:
        wait_until(lambda: children_of(runtime.pid), "the namespace's first process")
        [server] = children_of(runtime.pid)
        if not runtime_stays:
            (CGROUP / "cgroup.procs").write_text(str(runtime.pid))
        assert runtime.stdin is not None
        runtime.stdin.write(b"go\n")
        runtime.stdin.close()
        yield cgroup, runtime, server, log
    finally:
        if runtime.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)  # PID 1: its namespace dies with it
            runtime.wait(timeout=30)
        _remove_cgroup_tree(cgroup)


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Container]]:
    """The running containerised server, shared by this module's tests; a new one is started
    when a test has stopped it (starting one costs ~13 s of imports in the emulated VM)."""
    with contextlib.ExitStack() as stack:
        current: list[Container] = []

        def running() -> Container:
            if current and current[-1].runtime.poll() is None:
                return current[-1]
            tmp_path = tmp_path_factory.mktemp("container")
            port = free_port()
            data_dir = tmp_path / "data"
            settings = {
                "JOBWORKER_LISTEN": f"127.0.0.1:{port}",
                "JOBWORKER_DATA_DIR": str(data_dir),
                "JOBWORKER_STOP_GRACE": "2",
            }
            cgroup, runtime, server, log = stack.enter_context(container(tmp_path, settings))
            wait_listening(port, runtime, log, timeout=90)
            current.append(Container(cgroup, runtime, server, port, data_dir, log))
            return current[-1]

        yield running


@pytest.fixture
def served(containers: Callable[[], Container]) -> Container:
    """A containerised server that listens, with the PKI it created in its data directory."""
    return containers()


async def run_to_end(client: Client, program: str, args: list[str], limits: Limits) -> JobStatus:
    started = await client.start(program, args, limits)
    async with client.output(started.id) as output:
        async for _ in output:
            pass
    return await client.status(started.id)


def stop_server(served: Container) -> int:
    os.kill(served.pid, signal.SIGTERM)  # PID 1 receives only the signals it handles
    return served.runtime.wait(timeout=60)  # unshare exits with its child's exit code


async def test_the_server_is_pid_1_takes_its_namespace_root_and_jobs_get_limits(
    served: Container,
) -> None:
    status = Path(f"/proc/{served.pid}/status").read_text()
    assert f"NSpid:\t{served.pid}\t1\n" in status, "the server is PID 1 inside"
    assert "running as PID 1" in served.log_text()
    assert "moved the worker into cgroup /sys/fs/cgroup/server" in served.log_text()
    assert (served.cgroup / "server" / "cgroup.procs").read_text().split() == [str(served.pid)]
    assert (served.cgroup / "cgroup.procs").read_text() == "", "no internal processes"
    assert set((served.cgroup / "cgroup.subtree_control").read_text().split()) >= CONTROLLERS
    jobs_control = (served.cgroup / "jobs" / "cgroup.subtree_control").read_text().split()
    assert set(jobs_control) >= CONTROLLERS
    for line in served.log_text().splitlines():
        if "cannot be enforced" in line:  # I/O limits: the data directory is on a tmpfs
            assert "memory_bytes" not in line and "cpu_millis" not in line, line

    async with served.client() as client:
        limits = Limits(memory_bytes=64 << 20, cpu_millis=500, pids=32)
        job = await client.start("sleep", ["300"], limits)
        assert job.unenforced == frozenset()
        job_cgroup = served.job_cgroup(job.id)
        assert (job_cgroup / "memory.max").read_text().strip() == str(64 << 20)
        assert (job_cgroup / "cpu.max").read_text().strip() == "50000 100000"
        assert (job_cgroup / "pids.max").read_text().strip() == str(32 + HELPER_PROCESSES)
        assert (job_cgroup / "cgroup.procs").read_text().split() != []
        stopped = await client.stop(job.id)
        assert stopped.state is JobState.STOPPED
        assert not job_cgroup.exists()

        hog = "b = bytearray(200 << 20)"
        oom = await run_to_end(client, JOB_PYTHON, ["-S", "-c", hog], Limits(memory_bytes=50 << 20))
        assert (oom.state, oom.oom_killed, oom.signal) == (
            JobState.TERMINATED,
            True,
            signal.SIGKILL,
        )
        fits = await run_to_end(client, JOB_PYTHON, ["-S", "-c", "b = bytearray(8 << 20)"], limits)
        assert (fits.state, fits.exit_code, fits.oom_killed) == (JobState.COMPLETED, 0, False)


async def test_orphaned_grandchildren_are_reaped_by_pid_1(served: Container) -> None:
    async with served.client() as client:
        # An orphan that exits by itself while its job still runs: the subshell starts a sleep
        # and exits, the sleep is reparented to the job's init (PID 1 of the job's own
        # namespace), which reaps it after 2 s.
        job = await client.start("sh", ["-c", "(sleep 2 &); exec sleep 300"])
        procs = served.job_cgroup(job.id) / "cgroup.procs"
        found: list[int] = []

        def orphan_found() -> bool:
            found[:] = [pid for pid in pids_in(procs) if command_line(pid) == ["sleep", "2"]]
            return bool(found) and proc_stat(found[0]) is not None

        await async_wait_until(orphan_found, "the orphan in the job's cgroup")
        orphan = found[0]
        in_job = pids_in(procs)
        (init,) = [pid for pid in in_job if (proc_stat(pid) or ("", 0))[1] not in in_job]
        await async_wait_until(
            lambda: (proc_stat(orphan) or ("", 0))[1] == init, "the orphan's new parent"
        )
        await async_wait_until(lambda: proc_stat(orphan) is None, "the orphan to be reaped")
        assert (await client.status(job.id)).state is JobState.RUNNING
        # What reaches the server is the job's init itself, when the job's monitor (the
        # server's child) dies first: PID 1 must collect it.
        monitor = (proc_stat(init) or ("", 0))[1]
        assert (proc_stat(monitor) or ("", 0))[1] == served.pid
        os.kill(monitor, signal.SIGKILL)
        await async_wait_until(lambda: proc_stat(init) is None, "the orphaned init to be reaped")
        assert served.zombies() == []
        with anyio.fail_after(30):
            while (await client.status(job.id)).state is JobState.RUNNING:
                await anyio.sleep(0.05)

        # A job that exits at once, leaving a grandchild behind (killed with the job's cgroup).
        ended = await run_to_end(client, "sh", ["-c", 'sh -c "sleep 0.2" & exit 0'], Limits())
        assert (ended.state, ended.exit_code) == (JobState.COMPLETED, 0)
        # A grandchild in a new session that outlives its parent by a little.
        ended = await run_to_end(
            client, "sh", ["-c", "setsid sh -c 'sleep 0.3' & sleep 0.1; exit 3"], Limits()
        )
        assert (ended.state, ended.exit_code) == (JobState.COMPLETED, 3)
        await async_wait_until(lambda: served.zombies() == [], "no zombie under PID 1")
        assert children_of(served.pid) == {}, "nothing of the jobs is left"


async def test_sigterm_stops_jobs_exits_0_and_removes_every_job_cgroup(
    served: Container,
) -> None:
    async with served.client() as client:
        ids = [
            (await client.start("sleep", ["300"], Limits(memory_bytes=32 << 20))).id,
            (await client.start("sh", ["-c", "while :; do :; done"], Limits(cpu_millis=100))).id,
        ]
        # Ignores SIGTERM (once it says so): ends by cgroup.kill after the 2 s grace.
        stubborn = await client.start(
            "sh", ["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
        )
        ids.append(stubborn.id)
        async with client.output(stubborn.id) as output:
            assert await output.__anext__() == b"ready\n"
    assert all(served.job_cgroup(job_id).exists() for job_id in ids)

    before = len(served.log_text())
    started = time.monotonic()
    assert stop_server(served) == 0, served.log_text()
    assert 2 <= time.monotonic() - started < 20  # the grace period, and no more than needed
    log = served.log_text()[before:]
    assert "received SIGTERM" in log
    assert log.count("ended: stopped") == 3, log
    assert log.count("did not stop within 2.0 s: killing it") == 1, log
    # Removed by the server itself, so empty before it exited (PID 1's exit would kill the
    # rest of its namespace anyway, but not remove cgroups).
    assert not (served.cgroup / "jobs").exists(), "every job cgroup is removed"
    assert "Traceback" not in log


async def test_a_namespace_root_shared_with_another_process_warns_once(tmp_path: Path) -> None:
    """The runtime's own process stays in the container's cgroup: no controllers for jobs."""
    port = free_port()
    data_dir = tmp_path / "data"
    settings = {"JOBWORKER_LISTEN": f"127.0.0.1:{port}", "JOBWORKER_DATA_DIR": str(data_dir)}
    with container(tmp_path, settings, runtime_stays=True) as (cgroup, runtime, server, log):
        wait_listening(port, runtime, log, timeout=90)
        text = log.read_text()
        warnings = [line for line in text.splitlines() if "no internal processes" in line]
        assert len(warnings) == 1, text
        assert "holds processes that are not the worker's (pids 1 outside this PID " in text
        assert str(runtime.pid) not in warnings[0]
        assert "cannot enable the memory, cpu, io, pids controllers" in warnings[0]
        assert (cgroup / "cgroup.procs").read_text().split() == [str(runtime.pid)]
        served = Container(cgroup, runtime, server, port, data_dir, log)
        async with served.client() as client:
            with pytest.raises(FailedPrecondition):
                await client.start("true", [], Limits(memory_bytes=64 << 20))
            ran = await run_to_end(client, "sh", ["-c", "exit 4"], Limits())
            assert (ran.state, ran.exit_code) == (JobState.COMPLETED, 4)
        assert stop_server(served) == 0


def test_a_read_only_cgroup_mount_fails_at_start_saying_what_to_pass(tmp_path: Path) -> None:
    settings = {"JOBWORKER_DATA_DIR": str(tmp_path / "data")}
    with container(tmp_path, settings, read_only=True) as (cgroup, runtime, _, log):
        assert runtime.wait(timeout=60) == 1
        text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    assert errors[0].startswith(
        "error: cannot create cgroups under /sys/fs/cgroup: the cgroup2 file system is "
        "mounted read-only here"
    )
    for advice in ("--cgroupns=private", "--privileged", "Delegate=yes", "docs/deploy.md"):
        assert advice in errors[0]
    assert "Traceback" not in text
    assert not (cgroup / "server").exists()
