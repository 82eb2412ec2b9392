"""Starting a job's program inside its cgroup, namespaces and identity, with no window.

Python cannot ``clone3(CLONE_INTO_CGROUP)``, cannot create a PID namespace for a child on
3.11, and ``preexec_fn`` is unsafe in a threaded process. So the worker starts a small
native helper, ``jobworker-init`` (``init.c`` beside this file, built at install), as root
and with an empty environment (the job's comes through a memory file). The helper creates
the job's init straight into its cgroup and namespaces; the init sets up the job's mounts,
and only then does the program's own process drop to the job's account, look the program
up on the job's PATH and ``exec`` it. The program's first instruction, and everything it
ever forks, run inside the cgroup, the namespaces and the account; ``init.c`` describes
each step.

The helper reports any failure before the exec on a pipe, and a successful exec closes the
pipe without a word, so :func:`spawn_job` returns only once the program really runs, and a
program the job's account cannot find or run (or a working directory it cannot enter) is
an error from start. The server itself only checks the program's form: looking it up with
root's rights would tell a caller which files only root may see exist.

The helper's exit status is the program's own: its exit code, or death by the same signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jobworker.errors import ConfigError, InvalidCommand, Unavailable
from jobworker.models import Network
from jobworker.worker.accounts import Account

__all__ = [
    "DEFAULT_PATH",
    "HELPER",
    "HELPER_PROCESSES",
    "Launch",
    "Monitor",
    "check_isolation",
    "check_program",
    "job_environment",
    "spawn_job",
    "wait_readable",
]

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HELPER: Final = Path(__file__).with_name("jobworker-init")
# Processes of the helper in every job's cgroup: the namespace's init (the monitor stays in
# the worker's cgroup).
HELPER_PROCESSES: Final = 1
_REPORT_FD: Final = 3  # where the helper finds the report pipe (init.c)
_EXIT_FD: Final = 4  # and the directory of exit files
_ENV_FD: Final = 5  # and the program's environment (never in a command line)


def check_program(program: str) -> str:
    """``program`` if it is a bare name (looked up on the job's PATH) or an absolute path.

    Whether it exists and may be run is the job's user's to find out, in the helper: the
    server looking as root would tell a caller about files only root may see.
    """
    if "/" in program and not program.startswith("/"):
        raise InvalidCommand(
            f"program {program!r} must be an absolute path or a bare name found on PATH"
        )
    return program


def job_environment(
    job_id: str, home: str, requested: Mapping[str, str], base: Mapping[str, str]
) -> dict[str, str]:
    """The small, predictable environment a job starts with, then what it asked for.

    ``JOBWORKER_JOB_ID`` is always the job's own id, whatever was asked.
    """
    env = {"PATH": base.get("PATH") or DEFAULT_PATH, "HOME": home}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in base:
            env[name] = base[name]
    env.update(requested)
    env["JOBWORKER_JOB_ID"] = job_id
    return env


@dataclass(frozen=True)
class Launch:
    """Everything the helper needs to start one job's program."""

    program: str  # absolute, resolved
    args: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    account: Account
    network: Network
    cgroup: Path
    data_dir: Path
    work_dir: Path


def _flags(network: Network) -> str:
    return "n" if network is Network.NONE else "-"


def helper_path() -> Path:
    """The helper, or :class:`ConfigError` if this installation has none."""
    if not os.access(HELPER, os.X_OK):
        raise ConfigError(
            f"the job helper {HELPER} is missing: jobworker was installed without building "
            "it; reinstall it where a C compiler is available (Debian: apt-get install gcc "
            "libc6-dev)"
        )
    return HELPER


async def check_isolation(network: Network) -> None:
    """Raise :class:`ConfigError` unless this host lets the worker isolate jobs."""
    process = await asyncio.create_subprocess_exec(
        helper_path(),
        "check",
        _flags(network),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={},
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        why = stderr.decode(errors="replace").strip() or f"exit status {process.returncode}"
        if "mount-private" in why and os.strerror(errno.EINVAL) in why and not _root_mounted():
            raise ConfigError(
                f"the job helper cannot make the jobs' mounts private ({why}): the root "
                "directory is not a mount point, as in a chroot; bind-mount the root onto "
                "itself first (mount --bind / /), or run the server outside the chroot"
            )
        raise ConfigError(
            f"this host does not let the worker give jobs their own namespaces ({why}): run "
            "it as root, and in a container with --privileged (see docs/deploy.md)"
        )


def _root_mounted() -> bool:
    """Whether ``/`` is a mount point of this mount namespace (it is not in a chroot)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            return any(line.split()[4] == "/" for line in mounts if len(line.split()) > 4)
    except OSError:
        return True


class Monitor:
    """The job's monitor process, a child of the worker, known by a pidfd.

    Its exit status is the program's own (``init.c``). Started with ``posix_spawn`` and
    waited for through its pidfd in the event loop: no thread per job, and a pid that can
    never name another process once this one is reaped.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._notifying = False
        self.returncode: int | None = None

    def on_exit(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once, in the event loop, when the process has exited (it is
        then a zombie, for :meth:`wait` to collect). No task waits meanwhile: a running job
        costs the worker a descriptor and a selector entry. :meth:`wait` and :meth:`close`
        cancel it."""
        loop = asyncio.get_running_loop()

        def exited() -> None:
            self._stop_notifying()
            callback()

        loop.add_reader(self._pidfd, exited)
        self._notifying = True

    def _stop_notifying(self) -> None:
        if self._notifying:
            self._notifying = False
            asyncio.get_running_loop().remove_reader(self._pidfd)

    async def wait(self) -> int:
        """The exit status, as ``Popen.returncode`` puts it (minus the signal number)."""
        if self.returncode is not None:
            return self.returncode
        self._stop_notifying()
        while True:
            try:
                # WNOHANG: never blocks; the pidfd said the process is gone.
                result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)  # noqa: ASYNC222
            except ChildProcessError:
                # Someone else reaped it: its status is lost.
                self.returncode = -signal.SIGKILL
                break
            if result is not None:
                self.returncode = _returncode(result)
                break
            await wait_readable(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        return self.returncode

    def close(self) -> None:
        """Stop watching the process (it goes on); its exit status is then not collected."""
        self._stop_notifying()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def send_signal(self, signum: signal.Signals) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)


def _returncode(info: os.waitid_result) -> int:
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` (a pipe or a pidfd) is readable, in the event loop."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)


def _helper_argv(launch: Launch) -> list[str]:
    return [
        str(helper_path()),
        "run",
        str(launch.cgroup),
        str(launch.account.uid),
        str(launch.account.gid),
        _flags(launch.network),
        str(launch.data_dir),
        str(launch.work_dir),
        launch.cwd,
        launch.program,
        launch.program,
        *launch.args,
    ]


async def spawn_job(launch: Launch, output_fd: int, exits_fd: int) -> Monitor:
    """Start the job's program through the helper; return once the program runs.

    stdin is /dev/null; stdout and stderr both go to ``output_fd``, so the log keeps the
    order in which they were written. When the job ends, its init writes the program's wait
    status to a file named after the job in the directory open as ``exits_fd``. The job gets
    a new session, so terminal signals meant for the worker do not reach it. Raises
    :class:`InvalidCommand` if the job's account cannot run the program or enter its
    directory, :class:`Unavailable` if the host refused something else; the helper has
    exited by then.
    """
    env_fd = _environment_file(launch.env)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    given = (output_fd, write_end, exits_fd, env_fd)
    # posix_spawn applies the dup2s in order: no source may be the target of an earlier one.
    output, report_w, exit_w, env_r = moved = [_above(fd, _ENV_FD) for fd in given]
    try:
        try:
            pid = os.posix_spawn(  # noqa: ASYNC221 - returns once the helper is exec'd (vfork)
                str(helper_path()),
                _helper_argv(launch),
                {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, output, 1),
                    (os.POSIX_SPAWN_DUP2, output, 2),
                    (os.POSIX_SPAWN_DUP2, report_w, _REPORT_FD),
                    (os.POSIX_SPAWN_DUP2, exit_w, _EXIT_FD),
                    (os.POSIX_SPAWN_DUP2, env_r, _ENV_FD),
                ],
                setsid=True,
            )
            monitor = Monitor(pid)
        finally:
            os.close(write_end)
            os.close(env_fd)
            for fd, original in zip(moved, given, strict=True):
                if fd != original:
                    os.close(fd)
        report = await _read_to_end(read_end)
    finally:
        os.close(read_end)
    if report:
        await monitor.wait()
        raise _start_error(report.decode(errors="replace"), launch)
    return monitor


async def _read_to_end(fd: int) -> bytes:
    """Everything written to the pipe ``fd`` until its last writer closes it."""
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def _environment_file(env: Mapping[str, str]) -> int:
    """A memory file holding ``env`` as NUL-terminated ``NAME=VALUE`` entries, at offset 0.

    The helper reads the job's environment from it: in its command line, every user of the
    host could read it (``/proc/PID/cmdline``), where ``/proc/PID/environ`` is private.
    """
    fd = os.memfd_create("jobworker-env", os.MFD_CLOEXEC)
    try:
        data = memoryview(
            b"".join(f"{name}={value}".encode() + b"\0" for name, value in env.items())
        )
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _above(fd: int, floor: int) -> int:
    """``fd``, or a close-on-exec copy of it numbered above ``floor``."""
    return fd if fd > floor else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor + 1)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _start_error(report: str, launch: Launch) -> Exception:
    """The error for the helper's report ``STAGE ERRNO``."""
    stage, _, number = report.partition(" ")
    code = int(number) if number.isdigit() else 0
    why = os.strerror(code) if code else "unknown error"
    who = "the job's user" if launch.account.uid else "root"
    if stage == "exec":
        if code == errno.E2BIG:
            return InvalidCommand(
                "the program's arguments and environment are too long for this host"
            )
        if code in (errno.ENOENT, errno.ENOTDIR):
            where = "on the job's PATH" if "/" not in launch.program else "there"
            return InvalidCommand(
                f"program {launch.program!r} was not found {where} by {who}: it does not "
                "exist, or that user cannot reach it"
            )
        return InvalidCommand(f"program {launch.program!r} cannot be run by {who}: {why}")
    if stage == "chdir":
        return InvalidCommand(f"working directory {launch.cwd!r} cannot be entered by {who}: {why}")
    return Unavailable(f"the worker cannot start a job now: {stage} failed: {why}")
