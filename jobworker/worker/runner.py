"""A job whose processes may still exist: its supervision, its stop, its end.

::

    start ──> RUNNING ──(the program exits by itself)────────────────────> COMPLETED
                 │    ──(the program is killed by a signal we did not send)──> TERMINATED
                 │    ──stop: SIGTERM to every process, grace, cgroup.kill──> STOPPED
                 └────(it ended unobserved, and its status was not recorded)─> LOST

A :class:`RunningJob` exists only while a process of the job may: from its start (or its
adoption by a later server) until its cgroup is empty. The job is over only when its cgroup
is empty: the supervisor kills anything the program left behind (``cgroup.kill``), waits for
``cgroup.events`` to say ``populated 0`` (through inotify), reads the final accounting and
removes the cgroup. Only then is the final status returned, so a final state always means:
no process of the job exists and the log is complete.

The program's exit status comes from the job's monitor, when this worker started the job
(its child, ``process.Monitor``), else from the job's exit file, which the job's init writes
before it exits (``init.c``): a job adopted after a restart is known by its cgroup, never by
a pid alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from jobworker.errors import CgroupError
from jobworker.models import JobState, JobStatus, Usage
from jobworker.worker.cgroup import JobCgroup
from jobworker.worker.flags import Flag
from jobworker.worker.notify import FileWatcher
from jobworker.worker.process import Monitor, wait_readable

__all__ = ["RunningJob", "empty_cgroup", "outcome", "read_exit_file"]

log = logging.getLogger(__name__)


async def empty_cgroup(cgroup: JobCgroup, watcher: FileWatcher, *, kill: bool = True) -> None:
    """Wait until ``cgroup`` is empty (woken by inotify), killing what is in it unless
    ``kill`` is false."""
    async with watcher.watch(cgroup.events_file) as waiter:
        killed = not kill
        while True:
            waiter.clear()
            if not cgroup.populated():
                return
            if not killed:
                cgroup.kill()
                killed = True
            await waiter.wait()


def read_exit_file(path: Path) -> int | None:
    """The raw wait status the job's init wrote, or None if it wrote none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _is_monitor_of(pid: int, cgroup: Path) -> bool:
    """Whether ``pid`` is a jobworker-init monitor whose command line names ``cgroup``."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return len(argv) > 2 and argv[1] == b"run" and argv[2] == os.fsencode(cgroup)


def outcome(wait_status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a raw wait status."""
    if os.WIFSIGNALED(wait_status):
        return None, os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status), None


class RunningJob:
    """One job while any process of it may exist.

    ``monitor`` is the job's monitor when this worker started it; ``None`` for a job
    adopted from an earlier server. ``on_stop`` records a stop request durably before any
    signal is sent.
    """

    def __init__(
        self,
        status: JobStatus,
        cgroup: JobCgroup,
        exit_file: Path,
        watcher: FileWatcher,
        monitor: Monitor | None,
        on_stop: Callable[[JobStatus], object],
    ) -> None:
        self.status = status
        self.cgroup = cgroup
        self.exit_file = exit_file
        self._watcher = watcher
        self._monitor = monitor
        self._on_stop = on_stop
        self._ended = Flag()
        self._killed = False
        self._abandoned = False
        self._stopping = False

    @property
    def id(self) -> str:
        return self.status.id

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    def abandon(self) -> None:
        """The worker leaves without stopping the job: stop watching, leave it running."""
        self._abandoned = True

    def snapshot(self) -> JobStatus:
        """The status now, with what the kernel has counted so far."""
        usage = self.cgroup.usage()
        return replace(self.status, usage=usage, oom_killed=bool(usage.oom_kills))

    # Supervision: a task of the worker's, from the program's end (from adoption, for a job
    # an earlier worker started) until the cgroup is empty.

    async def supervise(self) -> JobStatus:
        """Wait for the program's end, empty the cgroup, and return the final status."""
        try:
            if self._monitor is not None:
                returncode: int | None = await self._monitor.wait()
                await empty_cgroup(self.cgroup, self._watcher)
            else:
                await empty_cgroup(self.cgroup, self._watcher, kill=False)
                returncode = None
                if read_exit_file(self.exit_file) is None:
                    # The init was killed before it wrote the file: the job's monitor, which
                    # lives outside the cgroup, writes it as it exits.
                    await self._monitor_gone()
        except BaseException:
            # The worker is going down abnormally: leave nothing running behind, unless it
            # leaves the job to the next worker on purpose.
            if not self._abandoned:
                self.cgroup.kill()
            raise
        usage = self.cgroup.usage()
        try:
            self.cgroup.remove()
        except CgroupError as exc:
            log.error("job %s: %s", self.id, exc)
        final = self._final(returncode, usage)
        self._ended.set()
        return final

    async def _monitor_gone(self) -> None:
        """Wait (up to 5 s) for the monitor of an adopted job to exit.

        The recorded pid names it only if that process is still a jobworker-init whose
        command line names this job's cgroup, checked after its pidfd is open.
        """
        try:
            pidfd = os.pidfd_open(self.status.pid)
        except (ProcessLookupError, OSError):
            return
        try:
            if not _is_monitor_of(self.status.pid, self.cgroup.path):
                return
            with anyio.move_on_after(5):
                await wait_readable(pidfd)
        except OSError:
            return
        finally:
            os.close(pidfd)

    def _final(self, returncode: int | None, usage: Usage) -> JobStatus:
        wait_status = read_exit_file(self.exit_file)
        if wait_status is not None:
            exit_code, signum = outcome(wait_status)
        elif returncode is not None:
            exit_code, signum = (None, -returncode) if returncode < 0 else (returncode, None)
        elif self._killed:
            exit_code, signum = None, int(signal.SIGKILL)
        else:
            exit_code = signum = None
        if exit_code is None and signum is None:
            state = JobState.LOST
        elif self.status.stopped_by:
            state = JobState.STOPPED
        elif signum is not None:
            state = JobState.TERMINATED
        else:
            state = JobState.COMPLETED
        return replace(
            self.status,
            state=state,
            exit_code=exit_code,
            signal=signum,
            oom_killed=bool(usage.oom_kills),
            usage=usage,
            ended_at=datetime.now(UTC),
        )

    # Stopping.

    def request_stop(self, task_group: anyio.abc.TaskGroup, grace: float, by: str) -> None:
        """Begin stopping the job (once). The escalation runs in the worker's task group,
        so it finishes even if whoever asked goes away."""
        if self._stopping or self._ended.is_set():
            return  # already stopping, or over
        if self._monitor is not None and self._monitor.returncode is not None:
            return  # already ending by itself
        self._stopping = True
        if not self.status.stopped_by:  # an earlier worker may have begun the stop
            self.status = replace(self.status, stopped_by=by or "-")
            self._on_stop(self.status)
        task_group.start_soon(self._escalate, grace)

    async def _escalate(self, grace: float) -> None:
        # SIGTERM to the job's monitor passes through its init to every process of the job
        # (init.c); a job adopted from an earlier server is signalled through its init.
        self._signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await self._ended.wait()
        if not self._ended.is_set():
            log.info("job %s did not stop within %.1f s: killing it", self.id, grace)
            self._killed = True
            self.cgroup.kill()

    def _signal(self, signum: signal.Signals) -> None:
        if self._monitor is not None:
            self._monitor.send_signal(signum)
            return
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            pidfd = self.cgroup.open_init()
            if pidfd is None:
                return
            try:
                signal.pidfd_send_signal(pidfd, signum)
            finally:
                os.close(pidfd)
