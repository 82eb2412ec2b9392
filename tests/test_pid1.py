"""``jobworker serve`` as PID 1 of a container, tested on the host with real processes.

- the orphan reaper: orphans reparented to a child subreaper are reaped, and the exit status
  of a protected child (a job's main process, which asyncio's child watcher waits for) is
  never taken, even under a storm of jobs and orphans exiting together;
- stop signals held from the first moment of ``jobworker serve``;
- ``jobworker serve`` as PID 1 of a new PID namespace (``unshare --pid``): SIGTERM is handled,
  an orphan of a job is reaped while the job runs, the exit code is 0;
- the start-up messages about cgroups that cannot be written or cannot pass on controllers.

The cgroup and mount namespaces of a real container run in the VM tier
(``tests/vm/test_entrypoint.py``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import JOBWORKER, client_env, free_port, proc_stat, wait_listening

from jobworker.cli import command_name
from jobworker.errors import ConfigError
from jobworker.server import signals
from jobworker.server.app import ServerConfig, serve
from jobworker.worker import JobSpec, JobState, Worker, WorkerConfig, cgroup
from jobworker.worker.cgroup import (
    CgroupTree,
    internal_processes_message,
    not_writable_error,
    read_only_message,
)
from jobworker.worker.reaper import OrphanReaper, is_child_subreaper, set_child_subreaper

# Processes as the kernel reports them.


def zombie_children(parent: int) -> list[int]:
    """Pids of the zombie children of ``parent`` (a scan of /proc)."""
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_stat(int(entry)) == ("Z", parent):
            zombies.append(int(entry))
    return zombies


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) and stat[1] == parent:
            out.append(int(entry))
    return out


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


async def async_wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.01)


def spawn(*argv: str) -> int:
    """Start a child with no Popen object around it (nothing else will wait for it)."""
    return os.posix_spawnp(argv[0], argv, os.environ)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This test process is a child subreaper for the test's duration."""
    set_child_subreaper()
    try:
        yield
    finally:
        set_child_subreaper(False)


# The reaper.


def test_set_child_subreaper_turns_the_flag_on_and_off() -> None:
    assert not is_child_subreaper()
    set_child_subreaper()
    try:
        assert is_child_subreaper()
    finally:
        set_child_subreaper(False)
    assert not is_child_subreaper()


def test_a_subreaper_without_a_reaper_keeps_zombies(subreaper: None) -> None:
    """The control experiment: an orphan that exits stays a zombie until someone reaps it."""
    shell = spawn("sh", "-c", "sleep 0.1 & exit 0")
    os.waitpid(shell, 0)
    wait_until(lambda: len(zombie_children(os.getpid())) == 1, what="the orphan's zombie")
    [zombie] = zombie_children(os.getpid())
    assert OrphanReaper(lambda pid: False).reap() == [(zombie, 0)]
    assert proc_stat(zombie) is None


def test_the_reaper_stops_at_a_protected_zombie_and_never_reaps_it() -> None:
    protected = spawn("sh", "-c", "exit 3")
    wait_until(lambda: proc_stat(protected) == ("Z", os.getpid()), what="a zombie")
    orphan = spawn("sh", "-c", "exit 4")
    wait_until(lambda: proc_stat(orphan) == ("Z", os.getpid()), what="a second zombie")
    reaper = OrphanReaper(lambda pid: pid == protected)

    assert reaper.reap() == []  # the first waitable child is protected: nothing is taken
    assert proc_stat(protected) == ("Z", os.getpid())
    assert proc_stat(orphan) == ("Z", os.getpid())
    assert os.waitpid(protected, 0) == (protected, 3 << 8)  # its owner gets its status
    assert reaper.reap() == [(orphan, 4)]  # and the one behind it is reaped next time
    killed = spawn("sleep", "60")
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: proc_stat(killed) == ("Z", os.getpid()), what="a killed zombie")
    assert reaper.reap() == [(killed, -signal.SIGKILL)]
    assert reaper.reap() == []


@pytest.mark.anyio
async def test_sigchld_reaps_an_orphaned_grandchild(subreaper: None) -> None:
    owned: set[int] = set()
    reaper = OrphanReaper(owned.__contains__)
    reaper.install()
    try:
        # The shell's own exit status belongs to Popen: protect it before the loop runs.
        shell = subprocess.Popen(  # noqa: ASYNC220 - no await may come before owned.add
            ["sh", "-c", "sleep 0.3 & echo $!; exit 7"], stdout=subprocess.PIPE
        )
        owned.add(shell.pid)
        assert shell.stdout is not None
        orphan = int(shell.stdout.readline())
        shell.stdout.close()
        await async_wait_until(lambda: shell.poll() is not None)
        assert shell.returncode == 7
        # Reparented to us, the subreaper; then it exits and SIGCHLD gets it reaped.
        await async_wait_until(lambda: proc_stat(orphan) in (("S", os.getpid()), None))
        await async_wait_until(lambda: proc_stat(orphan) is None)
        assert reaper.reaped >= 1
        assert zombie_children(os.getpid()) == []
    finally:
        reaper.uninstall()


@pytest.mark.anyio
async def test_jobs_keep_their_exit_status_in_a_storm_of_orphans(
    subreaper: None, config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Many jobs that exit at once, each leaving orphans that exit or are killed.

    Every job must report its own exit code (asyncio says 255 and logs a warning when
    someone else took the status), and no zombie may be left.
    """
    caplog.set_level(logging.WARNING, logger="asyncio")
    script = (
        "(sleep 0.0$1; exit 9) & "  # killed by cgroup.kill when the job ends, then reaped
        '(sh -c "exit 5" &) ; '  # a double fork: an orphan that exits at once
        "exit $1"
    )
    expected = {}
    async with Worker(replace(config, reap_orphans=True)) as worker:
        for round_ in range(4):
            started = []
            for i in range(15):
                code = (round_ * 15 + i) % 10
                program = ("sh", ("-c", script, "job", str(code)))
                if i % 3 == 0:
                    program = ("true", ())
                    code = 0
                status = await worker.start(JobSpec(program[0], program[1]))
                expected[status.id] = code
                started.append(status.id)
            with anyio.fail_after(30):
                for job_id in started:
                    while worker.status(job_id).state is JobState.RUNNING:
                        await anyio.sleep(0.01)
        results = {job_id: worker.status(job_id) for job_id in expected}
        await async_wait_until(lambda: not zombie_children(os.getpid()))
    assert {job_id: (s.state, s.exit_code) for job_id, s in results.items()} == {
        job_id: (JobState.COMPLETED, code) for job_id, code in expected.items()
    }
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert zombie_children(os.getpid()) == []


# Stop signals before the server runs.


def test_command_name_skips_the_global_options() -> None:
    assert command_name(["serve", "--listen", "0.0.0.0:1"]) == "serve"
    assert command_name(["--server", "serve:1", "list"]) == "list"
    assert command_name(["--server=h:1", "--cert", "c.pem", "serve"]) == "serve"
    assert command_name(["--ca", "x", "--key", "y", "run", "--", "serve"]) == "run"
    assert command_name(["--help"]) is None
    assert command_name([]) is None


@pytest.fixture
def held_signals() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        signals._held.clear()
        set_child_subreaper(False)  # serve() made this process one


def test_a_stop_signal_during_start_up_ends_serve_before_it_serves(
    held_signals: None, tmp_path: Path, unused_tcp_port: int
) -> None:
    signals.hold_stop_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
    os.kill(os.getpid(), signal.SIGINT)  # recorded, no KeyboardInterrupt
    assert signals.held_stop_signal() is signal.SIGTERM
    missing = tmp_path / "missing.pem"  # never read: the server does not start
    config = ServerConfig(
        WorkerConfig(data_dir=tmp_path), missing, missing, missing, port=unused_tcp_port
    )

    anyio.run(serve, config, backend="asyncio")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", unused_tcp_port))  # nothing ever listened there


@pytest.fixture
def unused_tcp_port() -> int:
    return free_port()


def caught_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_sigterm_while_serve_is_importing_exits_0_without_serving(
    tmp_path: Path, cgroup_root: Path, unused_tcp_port: int
) -> None:
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "JOBWORKER_LISTEN": f"127.0.0.1:{unused_tcp_port}",
        "JOBWORKER_DATA_DIR": str(tmp_path / "data"),
        "JOBWORKER_CGROUP_ROOT": str(cgroup_root),
    }
    with log.open("wb") as sink:
        server = subprocess.Popen([*JOBWORKER, "serve"], env=env, stdout=sink, stderr=sink)
    try:
        # Python's start-up takes ~30 ms, the imports of the server ~0.5 s: signal in between.
        wait_until(lambda: caught_signals(server.pid) & (1 << (signal.SIGTERM - 1)) != 0)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log.read_text()
    assert "received SIGTERM while starting: not serving" in text, text
    assert "serving on" not in text


# jobworker serve as PID 1 of a PID namespace.


def find_child(parent: int, timeout: float = 10) -> int:
    wait_until(lambda: bool(children(parent)), timeout, "the namespace's PID 1")
    return children(parent)[0]


@pytest.fixture
def pid1_server(tmp_path: Path, cgroup_root: Path, unused_tcp_port: int) -> Iterator[PidOne]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "JOBWORKER_LISTEN": f"127.0.0.1:{unused_tcp_port}",
        "JOBWORKER_DATA_DIR": str(data_dir),
        "JOBWORKER_CGROUP_ROOT": str(cgroup_root),
        "JOBWORKER_STOP_GRACE": "2",
    }
    with log.open("wb") as sink:
        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *JOBWORKER, "serve"],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    try:
        server = find_child(unshare.pid)
        wait_listening(unused_tcp_port, unshare, log)
        yield PidOne(unshare, server, client_env(unused_tcp_port, data_dir), log)
    finally:
        if unshare.poll() is None:
            os.kill(server, signal.SIGKILL)
            unshare.wait(timeout=30)


class PidOne:
    def __init__(
        self, unshare: subprocess.Popen[bytes], pid: int, env: dict[str, str], log: Path
    ) -> None:
        self.unshare = unshare
        self.pid = pid  # as this (the parent) PID namespace sees it
        self.env = env
        self.log = log

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*JOBWORKER, *args], env=self.env, capture_output=True, timeout=60, check=False
        )


def test_serve_as_pid_1_reaps_orphans_and_exits_0_on_sigterm(
    pid1_server: PidOne, cgroup_root: Path
) -> None:
    server = pid1_server
    assert "running as PID 1" in server.log.read_text()
    # Orphans inside a job go to the job's own init (PID 1 of its namespace). What reaches
    # the server is the init itself when the job's monitor (the server's child) dies first:
    # the init is reparented to PID 1, the server, which must collect it.
    started = server.cli("start", "--", "sleep", "300")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    job_procs = cgroup_root / "jobs" / job_id / "cgroup.procs"
    tree: dict[str, int] = {}

    def helpers_found() -> bool:
        # The init is in the job's cgroup; its parent, the monitor, is the server's child.
        for pid in map(int, job_procs.read_text().split()):
            stat = proc_stat(pid)
            monitor = proc_stat(stat[1]) if stat is not None else None
            if stat is not None and monitor is not None and monitor[1] == server.pid:
                tree["init"], tree["monitor"] = pid, stat[1]
        return len(tree) == 2

    wait_until(helpers_found, what="the job's monitor and init")
    os.kill(tree["monitor"], signal.SIGKILL)
    wait_until(lambda: proc_stat(tree["init"]) is None, what="the orphaned init to be reaped")
    assert zombie_children(server.pid) == []
    status = server.cli("status", "--json", job_id)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "terminated"

    os.kill(server.pid, signal.SIGTERM)  # PID 1 gets only the signals it handles
    assert server.unshare.wait(timeout=30) == 0, server.log.read_text()
    assert not cgroup_root.exists()
    assert "stopping jobs" in server.log.read_text()


def test_serve_as_pid_1_exits_0_on_sigint(pid1_server: PidOne) -> None:
    os.kill(pid1_server.pid, signal.SIGINT)
    assert pid1_server.unshare.wait(timeout=30) == 0, pid1_server.log.read_text()
    assert "received SIGINT" in pid1_server.log.read_text()


# Start-up messages about cgroups.


def fake_cgroup(path: Path, offered: str, procs: str) -> Path:
    path.mkdir()
    (path / "cgroup.controllers").write_text(offered)
    (path / "cgroup.subtree_control").write_text("")
    (path / "cgroup.procs").write_text(procs)
    return path


def test_a_cgroup_with_other_processes_gives_one_warning_naming_them_and_the_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    comm = Path(f"/proc/{sleeper.pid}/comm")
    wait_until(lambda: comm.read_text() == "sleep\n", what="the exec")  # comm changes late
    try:
        fake = fake_cgroup(
            tmp_path / "ns-root", "cpu io memory pids", f"0\n{sleeper.pid}\n{os.getpid()}\n"
        )
        with caplog.at_level(logging.WARNING):
            CgroupTree()._enable_controllers(fake)
    finally:
        sleeper.kill()
        sleeper.wait()
    [record] = caplog.records
    message = record.getMessage()
    assert f"pids {sleeper.pid} (sleep), 1 outside this PID namespace)" in message
    assert str(os.getpid()) not in message  # the worker itself is not a problem
    assert "memory, cpu, io, pids controllers" in message
    assert "'no internal processes' rule" in message
    assert "Delegate=yes" in message
    assert "--cgroup-root" in message
    assert (fake / "cgroup.subtree_control").read_text() == ""  # not even tried


def test_a_cgroup_with_only_the_worker_gets_its_controllers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_cgroup(tmp_path / "own", "memory pids", f"{os.getpid()}\n")
    writes: list[tuple[str, str]] = []
    monkeypatch.setattr(cgroup, "_write", lambda path, value: writes.append((path.name, value)))
    CgroupTree()._enable_controllers(fake)
    assert writes == [("cgroup.subtree_control", "+memory"), ("cgroup.subtree_control", "+pids")]


def test_the_internal_process_message_shortens_long_lists() -> None:
    message = internal_processes_message(Path("/x"), ["memory"], list(range(10**6, 10**6 + 8)))
    assert "3 more" in message
    assert "enable the memory controllers" in message


def test_a_read_only_cgroup_mount_fails_at_start_with_what_to_change(
    cgroup_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroup, "_read_only", lambda path: True)
    with pytest.raises(ConfigError) as raised:
        CgroupTree(cgroup_root).prepare()
    message = raised.value.message
    assert "mounted read-only" in message
    for advice in ("--cgroupns=private", "--privileged", "Delegate=yes", "docs/deploy.md"):
        assert advice in message, advice
    assert message == read_only_message(cgroup.find_cgroup2_mount())


def test_cgroup_write_errors_say_what_to_change() -> None:
    path = Path("/sys/fs/cgroup/server")
    read_only = not_writable_error(path, OSError(errno.EROFS, "Read-only file system"))
    assert "mounted read-only" in read_only.message
    denied = not_writable_error(path, OSError(errno.EACCES, "Permission denied"))
    assert "cannot write to cgroup /sys/fs/cgroup/server (Permission denied)" in denied.message
    assert "Run it as root" in denied.message
    assert "--cgroupns=private" in denied.message
    other = not_writable_error(path, OSError(errno.ENOSPC, "No space left on device"))
    assert other.message == "cannot set up cgroup /sys/fs/cgroup/server: No space left on device"
