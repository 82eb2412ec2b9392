"""One job's life: running, then exactly one final state.

::

    start ──> RUNNING ──(main process exits by itself)────────────> COMPLETED
                 │    ──(main process killed by a signal we did not send)──> TERMINATED
                 └──stop: SIGTERM to every process, grace, cgroup.kill──> STOPPED

Whatever ends the main process, the job is over only when its cgroup is empty: the
supervisor kills any process the job left behind (``cgroup.kill``), waits for
``cgroup.events`` to say ``populated 0`` (through inotify), reads the final accounting and
removes the cgroup. Only then is the final state published and are readers told, so a final
state always means: no process of the job exists and the log is complete.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from jobworker.errors import CgroupError
from jobworker.worker.accounts import Account
from jobworker.worker.cgroup import JobCgroup
from jobworker.worker.models import JobSpec, JobState, JobStatus, Limits, Usage
from jobworker.worker.notify import FileWatcher, Wakeup
from jobworker.worker.process import Launch, Monitor

__all__ = ["Job", "empty_cgroup"]

log = logging.getLogger(__name__)


async def empty_cgroup(cgroup: JobCgroup, watcher: FileWatcher) -> None:
    """Kill every process in ``cgroup`` and wait until it is empty (woken by inotify)."""
    async with watcher.watch(cgroup.events_file) as waiter:
        killed = False
        while True:
            waiter.clear()
            if not cgroup.populated():
                return
            if not killed:
                cgroup.kill()
                killed = True
            await waiter.wait()


class Job:
    """A started job. Created by the worker once its process is running in its cgroup."""

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        limits: Limits,
        unenforced: frozenset[str],
        cgroup: JobCgroup,
        process: Monitor,
        log_path: Path,
        watcher: FileWatcher,
        launch: Launch,
    ) -> None:
        self.id = job_id
        self.spec = spec
        self.limits = limits
        self.unenforced = unenforced
        self.cgroup = cgroup
        self.log_path = log_path
        self.launch = launch
        self.end_waiters: set[Wakeup] = set()
        self._process = process
        self._watcher = watcher
        self._started_at = datetime.now(UTC)
        self._ended = asyncio.Event()
        self._stop_requested = False
        self._final: JobStatus | None = None

    @property
    def owner(self) -> str:
        return self.spec.owner

    @property
    def account(self) -> Account:
        return self.launch.account

    def is_ended(self) -> bool:
        return self._ended.is_set()

    async def wait(self) -> JobStatus:
        """Wait until the job is over and return its final status."""
        await self._ended.wait()
        assert self._final is not None
        return self._final

    def status(self, *, usage: bool = True) -> JobStatus:
        """The job's status; ``usage=False`` skips reading the cgroup's counters."""
        if self._final is not None:
            return self._final
        if not usage:
            return self._snapshot(JobState.RUNNING, None, None, False, Usage(), None)
        return self._snapshot(
            JobState.RUNNING, None, None, self.cgroup.oom_killed(), self.cgroup.usage(), None
        )

    def _snapshot(
        self,
        state: JobState,
        exit_code: int | None,
        signum: int | None,
        oom_killed: bool,
        usage: Usage,
        ended_at: datetime | None,
    ) -> JobStatus:
        return JobStatus(
            id=self.id,
            state=state,
            owner=self.spec.owner,
            program=self.spec.program,
            args=self.spec.args,
            pid=self._process.pid,
            started_at=self._started_at,
            ended_at=ended_at,
            exit_code=exit_code,
            signal=signum,
            oom_killed=oom_killed,
            limits=self.limits,
            unenforced=self.unenforced,
            usage=usage,
            env=self.spec.env,
            cwd=self.launch.cwd,
            user=self.launch.account.name,
            uid=self.launch.account.uid,
            network=self.launch.network,
        )

    # The supervisor: one task per job, owned by the worker.

    async def supervise(self) -> None:
        """Wait for the main process, empty the cgroup, record the end, tell the readers."""
        try:
            returncode = await self._process.wait()
            await empty_cgroup(self.cgroup, self._watcher)
        except BaseException:
            # The worker is going down abnormally: leave nothing running behind.
            self.cgroup.kill()
            self._process.send_signal(signal.SIGKILL)
            raise
        oom_killed = self.cgroup.oom_killed()
        usage = self.cgroup.usage()
        try:
            self.cgroup.remove()
        except CgroupError as exc:
            log.error("job %s: %s", self.id, exc)
        exit_code, signum = (None, -returncode) if returncode < 0 else (returncode, None)
        if self._stop_requested:
            state = JobState.STOPPED
        elif signum is not None:
            state = JobState.TERMINATED
        else:
            state = JobState.COMPLETED
        self._final = self._snapshot(state, exit_code, signum, oom_killed, usage, datetime.now(UTC))
        self._ended.set()
        for waiter in self.end_waiters:
            waiter.set()
        log.info(
            "job %s ended: %s exit_code=%s signal=%s oom_killed=%s",
            self.id, state.value, exit_code, signum, oom_killed,
        )  # fmt: skip

    # Stopping.

    def request_stop(self, task_group: anyio.abc.TaskGroup, grace: float) -> None:
        """Begin stopping the job (once). The escalation runs in the worker's task group,
        so it finishes even if whoever asked goes away."""
        if self._stop_requested or self._process.returncode is not None:
            return  # already stopping, or already ending by itself
        self._stop_requested = True
        task_group.start_soon(self._escalate, grace)

    async def _escalate(self, grace: float) -> None:
        # The main process is the job's monitor: it passes SIGTERM to the namespace's init,
        # which sends it to every process of the job (worker/init.c).
        self._process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await self._ended.wait()
        if not self.is_ended():
            log.info("job %s did not stop within %.1f s: killing it", self.id, grace)
            self.cgroup.kill()
            # The monitor lives outside the job's cgroup (worker/process.py).
            self._process.send_signal(signal.SIGKILL)
