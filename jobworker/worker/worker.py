"""The Worker: the async context manager that owns every job.

Jobs live as long as the worker, not as long as whoever started them, and their records
longer still: every job is recorded in the data directory's store (``store.py``) before
``start`` returns. A worker holds its data directory and its cgroup root alone (``lock.py``).
On entry it adopts the jobs an earlier worker left running, records the end of those that
ended meanwhile, and kills any job cgroup it has no record of. Leaving the worker's ``async
with`` stops every running job (SIGTERM, grace, cgroup.kill), waits until each job's cgroup
is empty and removed, and then removes the worker's own cgroup directories; with
``on_exit=KEEP`` it leaves them running for the next worker instead.

The worker watches the log of each running job that has an output cap (one task per job,
woken by inotify) and drops the middle of it as it grows (``holes.py``), so its disk use
stays within the cap while the job writes as fast as it likes. A job is marked
``output_lost`` when the data directory's filesystem is found full while it runs (on its
log's events, a status query, or its end), since some of its writes may then have failed.
New jobs are refused while less than ``min_free`` is free there.

Ended jobs are removed (record, log, exit file, working directory) by :meth:`Worker.remove`
and :meth:`Worker.prune`, and by the worker itself past ``retain_for`` or ``retain_jobs``:
one task prunes whenever a job ends and when the oldest ended job's time is up.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc

from jobworker.errors import (
    FailedPrecondition,
    InvalidLimits,
    JobworkerError,
    LimitNotEnforceable,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    WorkerClosed,
)
from jobworker.models import (
    LIMIT_CONTROLLERS,
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    Network,
    format_size,
    limit_options,
    new_job_id,
    parse_job_id,
)
from jobworker.worker.accounts import Account, UidPool, host_account
from jobworker.worker.cgroup import CgroupTree, JobCgroup, block_device_of
from jobworker.worker.config import OnExit, WorkerConfig
from jobworker.worker.flags import Flag
from jobworker.worker.holes import ALIGN, OutputCap, dropped_bytes
from jobworker.worker.lock import exclusive
from jobworker.worker.logs import OutputStream, create_log
from jobworker.worker.notify import FileWatcher
from jobworker.worker.process import (
    Launch,
    Monitor,
    check_isolation,
    check_program,
    job_environment,
    spawn_job,
)
from jobworker.worker.reaper import OrphanReaper
from jobworker.worker.records import JobTable
from jobworker.worker.runner import RunningJob, empty_cgroup
from jobworker.worker.store import JobStore
from jobworker.worker.times import TimeRecorder, index_path
from jobworker.worker.workdir import WorkDirs

__all__ = ["Worker"]

log = logging.getLogger(__name__)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@dataclass
class _Ready:
    """The log (open) and working directory (root's until used) of the next job, made
    while the event loop waits for the last job's program: two file creations off the
    path of a start. A worker that dies with them leaves no record of them, so the next one
    removes them (``_recover``)."""

    job_id: str
    log_fd: int


def _delete_dir(path: Path) -> None:
    """Delete a removed job's directory; a failure is logged (what is left stays for the next
    start), never raised into the worker."""
    try:
        WorkDirs.delete(path)
    except OSError as exc:
        log.error("cannot delete %s (a removed job's directory): %s", path, exc)


class Worker:
    """Starts, stops, reports on and streams the output of jobs.

    ::

        async with Worker(WorkerConfig(data_dir=Path("/var/lib/jobworker"))) as worker:
            status = await worker.start(JobSpec("ls", ("-l",), owner="alice"))
            async with worker.output(status.id) as stream:
                async for chunk in stream:
                    ...
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config.validate()
        self._table = JobTable(JobStore(config.data_dir / "jobs.db"))
        self._cgroups = CgroupTree(config.cgroup_root)
        self._watcher = FileWatcher()
        self._stack = AsyncExitStack()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._logs_dir = config.data_dir / "logs"
        self._exits_dir = config.data_dir / "exits"
        self._exits_fd = -1
        self._ready: _Ready | None = None
        self._work_dirs = WorkDirs(config.data_dir / "work", config.data_dir / "removed")
        self._uids = UidPool(*config.job_uids)
        # Accounts a job may be run as, resolved once: every name must exist now.
        self._run_as = host_account(config.run_as) if config.run_as is not None else None
        self._allowed = {name: host_account(name) for name in sorted(config.allowed_users)}
        self._io_device: str | None = None
        self._enforceable: frozenset[str] = frozenset()
        self._closing = False
        # The jobs' monitors: children whose exit status their jobs collect.
        self._children: dict[int, Monitor] = {}
        self._spawning = 0
        # The output caps of running jobs that have one, by job id.
        self._caps: dict[str, OutputCap] = {}
        # Who records when each running job's output is written, by job id.
        self._recorders: dict[str, TimeRecorder] = {}
        # Running jobs that wrote while the data directory's filesystem was full.
        self._lost: set[str] = set()
        # Set when a job ends: the retention task looks again. Cancelled on leaving.
        self._ended = anyio.Event()
        self._retention = anyio.CancelScope()
        self._reaper = OrphanReaper(self.owns_child) if config.reap_orphans else None

    # Lifecycle.

    async def __aenter__(self) -> Worker:
        data = self.config.data_dir
        async with AsyncExitStack() as stack:
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            stack.enter_context(exclusive(data / "lock", f"data directory {data}"))
            for directory in (self._logs_dir, self._exits_dir):
                directory.mkdir(mode=0o700, exist_ok=True)
            # Jobs' inits create their exit files in it (init.c): one descriptor for all.
            self._exits_fd = os.open(self._exits_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, self._exits_fd)
            stack.callback(self._drop_ready)
            self._work_dirs.setup()
            await check_isolation(Network.NONE)
            root = self._cgroups.prepare()
            stack.enter_context(exclusive(root, f"cgroup root {root}"))
            self._cgroups.setup()
            stack.callback(self._cgroups.teardown)
            if self._reaper is not None:
                self._reaper.install()
                stack.callback(self._reaper.uninstall)
            stack.enter_context(self._table.store.opened())
            await stack.enter_async_context(self._watcher)
            stack.callback(self._close_monitors)
            stack.callback(self._close_recorders)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._on_exit)
            await self._recover()
            if self.config.retain_for is not None or self.config.retain_jobs is not None:
                self._task_group.start_soon(self._retain)
            self._io_device = self.config.io_device or block_device_of(data)
            self._enforceable = frozenset(
                name
                for name, controller in LIMIT_CONTROLLERS.items()
                if controller in self._cgroups.controllers
                and (controller != "io" or self._io_device is not None)
            )
            self._report_capabilities()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        # Jobs end the same way whatever ended the body; its exception propagates as it is.
        await self._stack.aclose()

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)

    def _report_capabilities(self) -> None:
        log.info("job cgroups under %s", self._cgroups.jobs)
        missing = sorted(set(LIMIT_CONTROLLERS) - self._enforceable)
        if missing:
            controllers = sorted({LIMIT_CONTROLLERS[n] for n in missing})
            log.warning(
                "these limits cannot be enforced here: %s (cgroup controllers not available "
                "under %s: %s%s); jobs still run, contained and killable, without them",
                limit_options(missing),
                self._cgroups.root,
                ", ".join(c for c in controllers if c not in self._cgroups.controllers) or "-",
                "; no block device for I/O limits" if self._io_device is None else "",
            )

    # Start-up: the jobs an earlier worker left.

    async def _recover(self) -> None:
        """Adopt the recorded jobs still running, record the end of those that ended while
        no worker ran, and kill whatever runs in a job cgroup that has no record."""
        assert self._task_group is not None
        cgroups = {cgroup.path.name: cgroup for cgroup in self._cgroups.leftovers()}
        for status in self._table.load():
            if status.state is not JobState.RUNNING:
                continue
            cgroup = cgroups.pop(status.id, None) or JobCgroup(self._cgroups.jobs / status.id)
            job = RunningJob(
                status, cgroup, self._exits_dir / status.id, self._watcher, None, self._table.update
            )
            if not status.user:
                self._uids.reserve(status.uid)
            self._table.adopt(job)
            self._watch_output(status)
            if cgroup.populated():
                self._task_group.start_soon(self._supervise, job)
                log.info("job %s of %r: adopted from an earlier server", status.id, status.owner)
            else:
                await self._supervise(job)  # it ended while no worker ran: record it now
        self._forget_unrecorded_files()
        for name, cgroup in cgroups.items():
            log.warning("killing job cgroup %s: there is no record of it", cgroup.path)
            with anyio.fail_after(30):
                await empty_cgroup(cgroup, self._watcher)
            cgroup.remove()
            self._forget_files(name)

    def _forget_unrecorded_files(self) -> None:
        """Remove logs and working directories that no record names (a worker that died
        with the next job's files made ahead, or a start cut short)."""
        known = self._table.ids()
        names = {entry.name.split(".", 1)[0] for entry in os.scandir(self._logs_dir)}
        names |= {entry.name for entry in os.scandir(self._work_dirs.root)}
        for name in names - known:
            self._forget_files(name)
        for discarded in self._work_dirs.discarded():  # an earlier worker's, not yet deleted
            self._delete_later(discarded)

    def _forget_files(self, job_id: str) -> None:
        """Remove what a job without a record left: its log, exit file and directory (moved
        away at once, deleted in a thread)."""
        try:
            job_id = parse_job_id(job_id)
        except JobworkerError:
            return
        log_path = self._log_path(job_id)
        log_path.unlink(missing_ok=True)
        index_path(log_path).unlink(missing_ok=True)
        (self._exits_dir / job_id).unlink(missing_ok=True)
        discarded = self._work_dirs.discard(self._work_dirs.path(job_id))
        if discarded is not None:
            self._delete_later(discarded)

    def _delete_later(self, path: Path) -> None:
        """Delete a discarded directory in a thread: it may hold any number of files. While
        the worker starts or closes (no task to run it in), here and now."""
        if self._task_group is None or self._closing:
            _delete_dir(path)
        else:
            self._task_group.start_soon(self._delete, path)

    async def _delete(self, path: Path) -> None:
        # Abandoned if the worker stops first: the next one deletes what is left (_recover).
        await anyio.to_thread.run_sync(_delete_dir, path, abandon_on_cancel=True)

    # Leaving.

    async def _on_exit(self) -> None:
        assert self._task_group is not None
        self._retention.cancel()
        with anyio.CancelScope(shield=True):
            if self.config.on_exit is OnExit.KEEP:
                jobs = list(self._table.running_jobs())
                for job in jobs:
                    job.abandon()
                self._task_group.cancel_scope.cancel()
                if jobs:
                    log.info("leaving %d running jobs for the next server", len(jobs))
                return
            await self._stop_all()

    async def _stop_all(self) -> None:
        """Stop every running job and wait until all are over, even if cancelled; a job that
        will not end (its cgroup never empties) is given up on after the grace and 30 s."""
        assert self._task_group is not None
        running = list(self._table.running_jobs())
        for job in running:
            job.request_stop(self._task_group, self.config.stop_grace, "server shutdown")
        with anyio.move_on_after(self.config.stop_grace + 30) as scope:
            for job in running:
                await self._table.wait_end(job.id)
        if scope.cancelled_caught:
            left = [job.id for job in self._table.running_jobs()]
            log.error("jobs did not end after being killed, left behind: %s", ", ".join(left))
            self._task_group.cancel_scope.cancel()

    # Capabilities.

    @property
    def enforceable_limits(self) -> frozenset[str]:
        """Names of the :class:`Limits` fields this host can enforce."""
        return self._enforceable

    @property
    def prepared_job_id(self) -> str | None:
        """The id the next job will get, whose log and directory are already made."""
        return self._ready.job_id if self._ready is not None else None

    @property
    def cgroup_root(self) -> Path:
        return self._cgroups.root

    # Operations.

    async def start(self, spec: JobSpec) -> JobStatus:
        """Start a job and return its first status, once it is recorded. Nothing is left
        behind if it fails."""
        if self._closing or self._task_group is None:
            raise WorkerClosed("the worker is shutting down and starts no new jobs")
        spec.validate()
        self._check_free_space()
        limits = self._effective_limits(spec.limits)
        max_output = self._effective_max_output(spec.max_output)
        unenforced = frozenset(limits.items()) - self._enforceable
        ready = self._take_ready()
        job_id = ready.job_id if ready is not None else new_job_id()
        work_dir = self._work_dirs.path(job_id)
        try:
            env = job_environment(job_id, str(work_dir), spec.env, os.environ)
            program = check_program(spec.program)
            account = self._account(spec)
        except BaseException:
            self._give_back(ready)
            raise
        try:
            enforced = Limits(**{k: v for k, v in limits.items().items() if k not in unenforced})
            launch = Launch(
                program=program,
                args=spec.args,
                env=env,
                cwd=spec.cwd or str(work_dir),
                account=account,
                network=spec.network or self.config.default_network,
                cgroup=Path(),
                data_dir=self.config.data_dir,
                work_dir=work_dir,
            )
            with anyio.CancelScope(shield=True):
                job = await self._launch(
                    job_id, spec, launch, enforced, unenforced, limits, max_output, ready
                )
        except BaseException:
            self._release(account)
            raise
        self._watch_output(job.status)
        # No task per running job: its end is seen by the event loop, and only then does a
        # task take over (to empty its cgroup and record it).
        monitor = job.monitor
        assert monitor is not None
        monitor.on_exit(partial(self._monitor_exited, job))
        log.info(
            "job %s started for %r as uid %d: %s %s (pid %d)",
            job_id, spec.owner, account.uid, program, list(spec.args), job.status.pid,
        )  # fmt: skip
        return job.status  # it has only just started: nothing to count yet

    def _account(self, spec: JobSpec) -> Account:
        """Who the job runs as: the account it named, the server's, or a uid of its own."""
        if spec.user is not None:
            account = self._allowed.get(spec.user)
            if account is None:
                allowed = ", ".join(self._allowed) or "none"
                raise PermissionDenied(
                    f"this server does not run jobs as {spec.user!r} (accounts it allows: "
                    f"{allowed}; see serve --allow-user)"
                )
            return account
        if self._run_as is not None:
            return self._run_as
        return self._uids.acquire()

    def _release(self, account: Account) -> None:
        """Give back the uid of a job that did not start."""
        if not account.name:
            self._uids.release(account.uid)

    async def _launch(
        self,
        job_id: str,
        spec: JobSpec,
        launch: Launch,
        enforced: Limits,
        unenforced: frozenset[str],
        limits: Limits,
        max_output: int | None,
        ready: _Ready | None,
    ) -> RunningJob:
        """Create the job's cgroup, log and directory (or take the ready ones), start it and
        record it; all or nothing. Called shielded: once the child exists it must become a
        job."""
        cgroup = self._cgroups.create_job(job_id, enforced, self._io_device)
        log_path = self._logs_dir / f"{job_id}.log"
        exit_file = self._exits_dir / job_id
        monitor: Monitor | None = None
        try:
            if ready is not None:
                self._work_dirs.give(launch.work_dir, launch.account)
                output_fd = ready.log_fd
            else:
                self._work_dirs.create(launch.work_dir, launch.account)
                output_fd = create_log(log_path)
            try:
                # The next job's files are made while this one's program starts.
                asyncio.get_running_loop().call_soon(self._make_ready)
                with self._starting_child():
                    launch = replace(launch, cgroup=cgroup.path)
                    monitor = await spawn_job(launch, output_fd, self._exits_fd)
                    self._children[monitor.pid] = monitor
            finally:
                os.close(output_fd)
            status = JobStatus(
                id=job_id,
                state=JobState.RUNNING,
                owner=spec.owner,
                owner_role=spec.owner_role,
                program=spec.program,
                args=spec.args,
                pid=monitor.pid,
                started_at=datetime.now(UTC),
                limits=limits,
                unenforced=unenforced,
                env=spec.env,
                cwd=launch.cwd,
                user=launch.account.name,
                uid=launch.account.uid,
                network=launch.network,
                max_output=max_output,
            )
            job = RunningJob(status, cgroup, exit_file, self._watcher, monitor, self._table.update)
            self._table.add(job)
        except BaseException as exc:
            if monitor is not None:
                # Started, but not recorded: it must not run unrecorded.
                cgroup.kill()
                monitor.send_signal(signal.SIGKILL)
                with anyio.move_on_after(10):
                    await monitor.wait()
                self._children.pop(monitor.pid, None)
            with anyio.move_on_after(10):
                await empty_cgroup(cgroup, self._watcher)
            log_path.unlink(missing_ok=True)
            exit_file.unlink(missing_ok=True)
            self._work_dirs.remove(launch.work_dir)
            cgroup.remove()
            if isinstance(exc, (OSError, sqlite3.Error)):
                # The program was checked already: this is the host (no pids, memory or disk
                # space left), and trying again later may work.
                log.error("cannot start a job: %s", exc)
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise Unavailable(f"the worker cannot start a job now: {why}") from exc
            raise
        return job

    # The next job's files, made ahead (see _Ready).

    def _make_ready(self) -> None:
        if self._ready is not None or self._closing:
            return
        job_id = new_job_id()
        work_dir = self._work_dirs.path(job_id)
        try:
            work_dir.mkdir(mode=0o700)
            log_fd = create_log(self._logs_dir / f"{job_id}.log")
        except OSError as exc:
            log.warning("cannot prepare the next job's files: %s", exc)
            self._work_dirs.remove(work_dir)
            return
        self._ready = _Ready(job_id, log_fd)

    def _take_ready(self) -> _Ready | None:
        ready, self._ready = self._ready, None
        return ready

    def _give_back(self, ready: _Ready | None) -> None:
        """A start that failed before it used the ready files: keep them for the next."""
        if ready is None:
            return
        if self._ready is None:
            self._ready = ready
        else:
            self._drop(ready)

    def _drop_ready(self) -> None:
        ready = self._take_ready()
        if ready is not None:
            self._drop(ready)

    def _drop(self, ready: _Ready) -> None:
        os.close(ready.log_fd)
        self._forget_files(ready.job_id)

    def _monitor_exited(self, job: RunningJob) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(self._supervise, job)

    def _close_monitors(self) -> None:
        """Stop watching the monitors of jobs that have not ended (the worker leaves)."""
        for monitor in self._children.values():
            monitor.close()

    def _close_recorders(self) -> None:
        """Stop recording output times of jobs that have not ended (the worker leaves; the
        next one takes up their indexes)."""
        for recorder in self._recorders.values():
            recorder.close()
        self._recorders.clear()

    async def _supervise(self, job: RunningJob) -> None:
        monitor = job.monitor
        try:
            final = await job.supervise()
        except Exception:
            log.exception("job %s: its end could not be observed", job.id)
            job.cgroup.kill()
            final = replace(job.status, state=JobState.LOST, ended_at=datetime.now(UTC))
        except BaseException:
            if monitor is not None:
                monitor.close()
            raise
        finally:
            if monitor is not None and self._children.get(monitor.pid) is monitor:
                del self._children[monitor.pid]
            if self._reaper is not None:
                # The reaper stops at a job's zombie; orphans behind it are reaped now.
                self._reaper.reap()
        self._ended.set()
        if self._table.finish(self._final_output(final)):
            # Else a later server needs the exit file to record the job's end.
            job.exit_file.unlink(missing_ok=True)
        if not final.user:
            # No process of the job is left: its uid may serve another job, which must not
            # find this job's files.
            self._work_dirs.lock(self._work_dirs.path(job.id))
            self._uids.release(final.uid)
        log.info(
            "job %s ended: %s exit_code=%s signal=%s oom_killed=%s",
            job.id, final.state.value, final.exit_code, final.signal, final.oom_killed,
        )  # fmt: skip

    # Orphans (see worker/reaper.py).

    @contextmanager
    def _starting_child(self) -> Iterator[None]:
        """While a job's process is being started its pid is unknown: protect every pid."""
        self._spawning += 1
        try:
            yield
        finally:
            self._spawning -= 1
            if self._reaper is not None:
                self._reaper.reap()

    # Output: caps and counts.

    def _log_path(self, job_id: str) -> Path:
        return self._logs_dir / f"{job_id}.log"

    def _watch_output(self, status: JobStatus) -> None:
        """Begin recording when a running job's output is written, and keeping its log
        within its cap, if it has one."""
        assert self._task_group is not None
        recorder = TimeRecorder(self._log_path(status.id), self._watcher)
        self._recorders[status.id] = recorder
        recorder.start()
        if status.max_output is None:
            return
        try:
            cap = OutputCap(self._log_path(status.id), status.max_output)
        except OSError as exc:
            log.error("job %s: its output cannot be capped: %s", status.id, exc)
            return
        self._caps[status.id] = cap
        self._task_group.start_soon(self._follow_log, status.id, cap)

    async def _follow_log(self, job_id: str, cap: OutputCap) -> None:
        """Whenever inotify says the job's log grew, until the job has ended: trim it to its
        cap, and note whether the disk is full."""
        waiter = Flag()
        at_end = self._table.end_callbacks(job_id)
        at_end.add(waiter.set)
        try:
            async with self._watcher.watch(self._log_path(job_id), waiter):
                while not self._table.is_ended(job_id):
                    waiter.clear()
                    cap.trim()
                    if self._disk_full():
                        self._lost.add(job_id)
                    await waiter.wait()
        except OSError as exc:
            # A file system without hole punching, or the log is gone: the job runs on.
            log.error("job %s: its output is no longer watched: %s", job_id, exc)
        finally:
            at_end.discard(waiter.set)
            if self._caps.get(job_id) is cap:
                del self._caps[job_id]
            cap.close()

    def _free_space(self) -> tuple[int, int]:
        """(bytes free to the worker, total bytes) of the data directory's filesystem."""
        fs = os.statvfs(self.config.data_dir)
        return fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize

    def _disk_full(self) -> bool:
        """Whether a write to the data directory's filesystem may fail for want of space."""
        return self._free_space()[0] < ALIGN

    def _check_free_space(self) -> None:
        """Refuse a new job while less than the configured minimum is free."""
        minimum = self.config.min_free
        if minimum is None:
            return
        free, total = self._free_space()
        need = minimum.bytes_of(total)
        if free < need:
            raise ResourceExhausted(
                f"the server's disk is nearly full: {_mib(free)} free, less than the "
                f"{_mib(need)} it keeps free for running jobs (serve --min-free "
                f"{minimum}); no new job starts until space is freed, for example by "
                "removing ended jobs"
            )

    def _with_output(self, status: JobStatus) -> JobStatus:
        """A running job's status with its output counted now."""
        if status.state is not JobState.RUNNING:
            return status
        try:
            size = self._log_path(status.id).stat().st_size
        except FileNotFoundError:
            return status
        cap = self._caps.get(status.id)
        dropped = cap.dropped_to - cap.head if cap is not None else status.output_dropped
        if self._disk_full():
            self._lost.add(status.id)
        lost = status.output_lost or status.id in self._lost
        return replace(status, output_bytes=size, output_dropped=dropped, output_lost=lost)

    def _final_output(self, final: JobStatus) -> JobStatus:
        """An ended job's status with its output's final size and dropped bytes, once the
        last trim has run (no process of the job is left to write)."""
        cap = self._caps.get(final.id)
        recorder = self._recorders.pop(final.id, None)
        if recorder is not None:
            recorder.finish()
        if final.id in self._lost or self._disk_full():
            final = replace(final, output_lost=True)
        self._lost.discard(final.id)
        try:
            if cap is not None:
                cap.trim()
            fd = os.open(self._log_path(final.id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.error("job %s: cannot measure its output: %s", final.id, exc)
            return final
        try:
            return replace(
                final, output_bytes=os.fstat(fd).st_size, output_dropped=dropped_bytes(fd)
            )
        except OSError as exc:
            log.error("job %s: cannot measure its output: %s", final.id, exc)
            return final
        finally:
            os.close(fd)

    def owns_child(self, pid: int) -> bool:
        """Whether the exit status of child ``pid`` belongs to the worker's jobs.

        True for the monitor of every job until its job has collected its exit status, and
        for every pid while a job's monitor is being started. The
        orphan reaper leaves these alone.
        """
        if self._spawning:
            return True
        process = self._children.get(pid)
        return process is not None and process.returncode is None

    def _effective_limits(self, requested: Limits) -> Limits:
        unavailable = sorted(set(requested.items()) - self._enforceable)
        if unavailable:
            raise LimitNotEnforceable(
                f"this host cannot enforce {limit_options(unavailable)}: the cgroup controller "
                "is not available to the worker; leave these limits out to run without them"
            )
        limits = requested.over(self.config.default_limits)
        if over := limits.exceeding(self.config.max_limits):
            details = ", ".join(
                f"{name} {value or 'unlimited'} > {top}"
                for name, (value, top) in sorted(over.items())
            )
            raise InvalidLimits(f"limits above this worker's maximum: {details}")
        return limits

    def _effective_max_output(self, requested: int | None) -> int | None:
        """The output cap of a job that asked for ``requested`` (None: the default)."""
        top = self.config.max_max_output
        value = requested if requested is not None else self.config.default_max_output
        if top is None:
            return value
        if value is None:
            return top
        if value > top:
            raise InvalidLimits(
                f"max_output {format_size(value)} is above this worker's maximum {format_size(top)}"
            )
        return value

    def status(self, job_id: str) -> JobStatus:
        return self._with_output(self._table.get(job_id))

    def running_count(self, owner: str, owner_role: str) -> int:
        """How many jobs of this owner (name and role) are running."""
        return self._table.running_count(owner, owner_role)

    def list(self, owner: str | None = None) -> list[JobStatus]:
        """Every job (or every job of ``owner``), oldest first."""
        return [
            self._with_output(s) for s in self._table.all() if owner is None or s.owner == owner
        ]

    async def stop(self, job_id: str, by: str = "") -> JobStatus:
        """Stop a job and return its final status once every process of it is gone.

        ``by`` names who asked, for the record. Stopping a job that already ended returns
        its final status unchanged.
        """
        if self._task_group is None:
            raise WorkerClosed("the worker is not running")
        status = self._table.record(job_id)
        job = self._table.running(status.id)
        if job is None:
            return status
        job.request_stop(self._task_group, self.config.stop_grace, by or "the worker")
        return await self._table.wait_end(status.id)

    def remove(self, job_id: str) -> JobStatus:
        """Remove an ended job: its record, log, exit file and working directory. Returns
        its final status. A reader still open on its output reads on to the end."""
        status = self._table.record(job_id)
        if not self._table.is_ended(status.id):
            raise FailedPrecondition(
                f"job {status.id} is still running: stop it first (jobworker stop {status.id}), "
                "then remove it"
            )
        self._table.remove(status.id)
        self._forget_files(status.id)
        log.info("job %s of %r removed", status.id, status.owner)
        return status

    def prune(
        self,
        older_than: float | None = None,
        keep: int | None = None,
        owned: Callable[[JobStatus], bool] | None = None,
    ) -> builtins.list[str]:
        """Remove the ended jobs that ended at least ``older_than`` seconds ago (``None``:
        any), and all but the newest ``keep`` ended jobs; only those ``owned``
        accepts. Returns the ids removed, oldest first."""
        now = datetime.now(UTC)
        ended = [
            s
            for s in self._table.ended()
            if s.state.is_final and s.ended_at is not None and (owned is None or owned(s))
        ]
        ended.sort(key=lambda s: s.ended_at or now)
        chosen: set[str] = set()
        if older_than is not None or keep is None:
            limit = older_than or 0.0
            chosen |= {
                s.id for s in ended if s.ended_at and (now - s.ended_at).total_seconds() >= limit
            }
        if keep is not None:
            chosen |= {s.id for s in ended[: max(len(ended) - keep, 0)]}
        removed = [s.id for s in ended if s.id in chosen]
        for job_id in removed:
            self.remove(job_id)
        return removed

    async def _retain(self) -> None:
        """Prune by the configured age and count whenever a job ends, and when the oldest
        ended job's time is up."""
        retain_for, retain_jobs = self.config.retain_for, self.config.retain_jobs
        with self._retention:
            await self._retain_loop(retain_for, retain_jobs)

    async def _retain_loop(self, retain_for: float | None, retain_jobs: int | None) -> None:
        while True:
            self._ended = anyio.Event()
            try:
                self.prune(retain_for, retain_jobs)
            except (OSError, sqlite3.Error) as exc:
                log.error("pruning ended jobs failed: %s", exc)
            wait = math.inf
            if retain_for is not None:
                ends = [s.ended_at for s in self._table.ended() if s.ended_at is not None]
                if ends:
                    age = (datetime.now(UTC) - min(ends)).total_seconds()
                    wait = max(retain_for - age, 0.0) + 0.01
            with anyio.move_on_after(wait):
                await self._ended.wait()

    def output(self, job_id: str, offset: int = 0, *, timestamps: bool = False) -> OutputStream:
        """The job's output from ``offset``, following it live until the job ends; each
        chunk stamped with when it was written if ``timestamps``."""
        status = self._table.record(job_id)
        recorder = self._recorders.get(status.id) if timestamps else None
        return OutputStream(
            self._log_path(status.id),
            offset,
            self.config.chunk_size,
            self._watcher,
            lambda: self._table.is_ended(status.id),
            self._table.end_callbacks(status.id),
            timestamps,
            None if recorder is None else recorder.set,
        )
