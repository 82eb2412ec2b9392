"""A real ``jobworker serve`` process on loopback, measured from outside through /proc.

:class:`Workspace` owns everything the benchmark creates (a PKI, data directories, a cgroup
directory); :class:`ServerProcess` runs one server in it. Both clean up on every exit path:
the server is terminated (SIGTERM, then SIGKILL), every job cgroup is killed and removed, and
the benchmark's own cgroup directory is gone at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from bench.proc import ProcSample, sample
from jobworker.certs import PkiPaths, init_pki
from jobworker.client import Client
from jobworker.worker.cgroup import find_cgroup2_mount

REPO_ROOT = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"serving on \S+:(\d+)")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 60.0


class BenchError(Exception):
    """Something broke: the benchmark reports it and exits non-zero."""


def remove_cgroup_tree(path: Path) -> None:
    """Kill every process under ``path`` and remove it with all its descendants."""
    if not path.exists():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _remove_cgroup(sub)
    _remove_cgroup(path)


def _remove_cgroup(path: Path) -> None:
    kill = path / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # the killed processes are still exiting


class Workspace:
    """Scratch files, a PKI and a cgroup directory for the whole run."""

    def __init__(self, cgroup_parent: Path | None = None, logs: Path | None = None) -> None:
        self.logs = logs  # where each server's log is copied when it stops
        self.root = Path(tempfile.mkdtemp(prefix="jobworker-bench-"))
        parent = cgroup_parent or find_cgroup2_mount()
        self.cgroup = parent / f"jobworker-bench-{os.getpid()}"
        self.pki = PkiPaths.in_dir(self.root / "pki")

    def __enter__(self) -> Workspace:
        try:
            init_pki(self.pki.directory)
            self.cgroup.mkdir()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            remove_cgroup_tree(self.cgroup)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def client(self, port: int) -> Client:
        return Client(
            "127.0.0.1",
            port,
            cert=self.pki.admin_cert,
            key=self.pki.admin_key,
            ca=self.pki.server_ca,
        )


class _Served:
    """A server process of the benchmark's, on 127.0.0.1: its pid, its log, a client, and
    its end (``_stop``) when the ``async with`` block ends."""

    workspace: Workspace
    log_path: Path
    port: int
    _process: asyncio.subprocess.Process | None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def sample(self) -> ProcSample:
        return sample(self.pid)

    def client(self) -> Client:
        return self.workspace.client(self.port)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _stop(self) -> None:
        raise NotImplementedError


class ServerProcess(_Served):
    """``python -m jobworker serve`` on 127.0.0.1 with a port of its choosing."""

    def __init__(
        self,
        workspace: Workspace,
        name: str,
        *,
        python: str = sys.executable,
        chunk_size: int | None = None,
        nofile: int | None = None,
    ) -> None:
        self.workspace = workspace
        self.name = name
        self.data_dir = workspace.root / name
        self.cgroup_root = workspace.cgroup / name
        self.log_path = workspace.root / f"{name}-server.log"
        self._python = python
        self._chunk_size = chunk_size
        self._nofile = nofile
        self._process: asyncio.subprocess.Process | None = None
        self.port = 0

    def log_file(self, job_id: str) -> Path:
        return self.data_dir / "logs" / f"{job_id}.log"

    async def __aenter__(self) -> ServerProcess:
        pki = self.workspace.pki
        args = [
            *("-m", "jobworker", "serve", "--listen", "127.0.0.1:0"),
            *("--data-dir", str(self.data_dir), "--cgroup-root", str(self.cgroup_root)),
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--client-ca", str(pki.client_ca), "--stop-grace", "2"),
        ]
        if self._chunk_size is not None:
            args += ["--chunk-size", str(self._chunk_size)]
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                self._python,
                *args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops it
            )
        try:
            if self._nofile is not None:  # as if started under `ulimit -n NOFILE`
                _, hard = resource.prlimit(self.pid, resource.RLIMIT_NOFILE)
                resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (self._nofile, hard))
            self.port = await self._wait_serving()
        except BaseException:
            await self._stop()
            raise
        return self

    async def _wait_serving(self) -> int:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self._process.returncode is not None:
                raise BenchError(
                    f"the server exited with {self._process.returncode} before serving:\n"
                    + self.log_tail()
                )
            await asyncio.sleep(0.02)
        raise BenchError(f"the server did not start within {_START_TIMEOUT:.0f} s")

    async def _stop(self) -> None:
        """SIGTERM (graceful: the server stops its jobs), then SIGKILL; then clean up."""
        process, self._process = self._process, None
        try:
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                except BaseException:
                    process.kill()  # cancelled while waiting: do not leave it running
                    raise
        finally:
            # Whatever happened above: no job and no cgroup of this server stays behind.
            remove_cgroup_tree(self.cgroup_root)
            if self.workspace.logs is not None and self.log_path.exists():
                self.workspace.logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, self.workspace.logs / self.log_path.name)
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    """SIGKILL a process that leads its own session, and every job it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class PeerProcess(_Served):
    """``python -m bench.grpcio_peer`` (grpcio's C core) on 127.0.0.1 with the server's
    certificate, key and client CA, in a process of its own, as :class:`ServerProcess` runs
    jobworker. Its jobs' logs, and the files it is given to serve, are in ``logs_dir``."""

    def __init__(
        self, workspace: Workspace, name: str, *, python: str = sys.executable, chunk_size: int
    ) -> None:
        self.workspace = workspace
        self.logs_dir = workspace.root / f"{name}-grpcio" / "logs"
        self.log_path = workspace.root / f"{name}-grpcio.log"
        self._python = python
        self._chunk_size = chunk_size
        self._process: asyncio.subprocess.Process | None = None
        self.port = 0

    def log_file(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def serve_file(self, path: Path) -> str:
        """A job id under which the peer serves ``path`` (a finished log) to its end."""
        job_id = str(uuid.uuid4())
        os.link(path, self.log_file(job_id))  # the same file: same inode, same page cache
        return job_id

    async def __aenter__(self) -> PeerProcess:
        pki = self.workspace.pki
        self.logs_dir.mkdir(parents=True)
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                self._python,
                *("-m", "bench.grpcio_peer", "--logs", str(self.logs_dir)),
                *("--cert", str(pki.server_cert), "--key", str(pki.server_key)),
                *("--client-ca", str(pki.client_ca), "--chunk-size", str(self._chunk_size)),
                stdin=subprocess.PIPE,  # it exits when this closes
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops it
            )
        try:
            assert self._process.stdout is not None
            try:
                async with asyncio.timeout(_START_TIMEOUT):
                    line = await self._process.stdout.readline()
            except TimeoutError:
                raise BenchError(
                    f"the grpcio peer did not start within {_START_TIMEOUT:.0f} s"
                ) from None
            if not line.strip().isdigit():
                await self._process.wait()
                missing = "grpc" in self.log_tail() and "ModuleNotFoundError" in self.log_tail()
                raise BenchError(
                    f"the grpcio peer exited with {self._process.returncode} before serving"
                    + (
                        f" (install grpcio for {self._python}: pip install '.[bench]')"
                        if missing
                        else ""
                    )
                    + ":\n"
                    + self.log_tail()
                )
            self.port = int(line)
        except BaseException:
            await self._stop()
            raise
        return self

    async def _stop(self) -> None:
        """Close its standard input (it kills its jobs and exits), then SIGKILL; clean up."""
        process, self._process = self._process, None
        try:
            if process is not None and process.returncode is None:
                assert process.stdin is not None
                process.stdin.close()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    _kill_group(process.pid)
                    await process.wait()
                except BaseException:
                    _kill_group(process.pid)
                    raise
        finally:
            if self.workspace.logs is not None and self.log_path.exists():
                self.workspace.logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, self.workspace.logs / self.log_path.name)
            shutil.rmtree(self.logs_dir.parent, ignore_errors=True)
