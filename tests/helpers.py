"""Small helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobworker.certs import PkiPaths
from jobworker.worker import Worker

JOBWORKER = [sys.executable, "-m", "jobworker"]


def _job_python() -> str:
    """A python3 that any job may run: the tests' own lives under root's home (0700)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return "python3-for-jobs-not-found"  # tests that use it fail with a clear InvalidCommand


JOB_PYTHON = _job_python()


def open_fds(worker: Worker | None = None) -> set[int]:
    """This process's open file descriptors; with ``worker``, but the log it holds open for
    its next job (made ahead while a start waits: worker.py)."""
    fds = {int(fd) for fd in os.listdir("/proc/self/fd")}
    if worker is None or worker.prepared_job_id is None:
        return fds
    ahead = f"{worker.prepared_job_id}.log"
    return {fd for fd in fds if not _names(fd, ahead)}


def _names(fd: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith("/" + name)
    except OSError:
        return False


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid`` as this PID namespace sees it, or None once it is reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    """Wait until a server process accepts connections; fail with its log if it dies first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.05)


def client_env(port: int, data_dir: Path) -> dict[str, str]:
    """The environment of a CLI that calls the server on ``port`` as its PKI's admin."""
    pki = PkiPaths.in_dir(data_dir / "pki")
    return {
        **os.environ,
        "JOBWORKER_SERVER": f"127.0.0.1:{port}",
        "JOBWORKER_CERT": str(pki.admin_cert),
        "JOBWORKER_KEY": str(pki.admin_key),
        "JOBWORKER_CA": str(pki.server_ca),
    }


class Served:
    """``jobworker serve`` as its own process on a free port, with the test's data directory
    and cgroup root (it creates its PKI on first start), and the CLI as its admin."""

    def __init__(self, tmp_path: Path, cgroup_root: Path, *options: str) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "serve.log"
        env = {
            **os.environ,
            "JOBWORKER_LISTEN": f"127.0.0.1:{self.port}",
            "JOBWORKER_DATA_DIR": str(self.data_dir),
            "JOBWORKER_CGROUP_ROOT": str(cgroup_root),
            "JOBWORKER_STOP_GRACE": "2",
        }
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [*JOBWORKER, "serve", *options], env=env, stdout=sink, stderr=sink
            )
        try:
            wait_listening(self.port, self.process, self.log)
        except BaseException:
            self.stop()
            raise
        self.env = client_env(self.port, self.data_dir)

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``jobworker ARGS...`` as the admin (or with ``env``), to its end."""
        return subprocess.run(
            [*JOBWORKER, *args],
            env=env or self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    __call__ = cli

    def start(self, *command: str) -> str:
        """The id of a job started with ``jobworker start -- COMMAND...``."""
        started = self.cli("start", "--", *command)
        assert started.returncode == 0, started.stderr
        return started.stdout.decode().strip()

    def stop(self) -> None:
        """SIGTERM, and wait for the server's bounded exit (if it still runs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@contextmanager
def serving(tmp_path: Path, cgroup_root: Path, *options: str) -> Iterator[Served]:
    """A :class:`Served` server for the ``with`` block; stopped at its end."""
    server = Served(tmp_path, cgroup_root, *options)
    try:
        yield server
    finally:
        server.stop()


def job_cgroups(worker: Worker) -> list[str]:
    """Names of the job cgroups that exist under the worker's cgroup root."""
    jobs = worker.cgroup_root / "jobs"
    return sorted(p.name for p in jobs.iterdir() if p.is_dir()) if jobs.exists() else []


def job_processes(worker: Worker, job_id: str) -> dict[int, int]:
    """The processes in a job's cgroup: pid in the job's PID namespace -> pid on the host.

    The job's helper processes (worker/process.py) are left out: its monitor is outside the
    namespace, its init is PID 1 there.
    """
    procs = worker.cgroup_root / "jobs" / job_id / "cgroup.procs"
    found = {}
    for host_pid in map(int, procs.read_text().split()):
        try:
            status = Path(f"/proc/{host_pid}/status").read_text()
        except FileNotFoundError:
            continue
        nspids = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        if len(nspids) >= 2 and int(nspids[-1]) > 1:
            found[int(nspids[-1])] = host_pid
    return found


def log_files(worker: Worker) -> list[str]:
    """The logs in the data directory, but the one made ahead for the next job."""
    ahead = f"{worker.prepared_job_id}.log"
    return sorted(p.name for p in (worker.config.data_dir / "logs").iterdir() if p.name != ahead)


def work_dirs(worker: Worker) -> list[str]:
    """The jobs' working directories, but the one made ahead for the next job."""
    ahead = worker.prepared_job_id
    return sorted(p.name for p in (worker.config.data_dir / "work").iterdir() if p.name != ahead)


async def read_all(worker: Worker, job_id: str, offset: int = 0) -> bytes:
    """Every byte of a job's output from ``offset``, following it until the job ends."""
    out = bytearray()
    async with worker.output(job_id, offset) as stream:
        async for chunk in stream:
            assert chunk.offset == offset + len(out)
            assert 0 < len(chunk.data) <= worker.config.chunk_size
            out += chunk.data
    return bytes(out)
