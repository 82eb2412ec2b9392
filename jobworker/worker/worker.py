"""The Worker: the async context manager that owns every job.

Jobs live as long as the worker, not as long as whoever started them. Leaving the worker's
``async with`` stops every running job (SIGTERM, grace, cgroup.kill), waits until each job's
cgroup is empty and removed, and then removes the worker's own cgroup directories.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc

from jobworker.errors import (
    InvalidLimits,
    JobNotFound,
    LimitNotEnforceable,
    PermissionDenied,
    Unavailable,
    WorkerClosed,
)
from jobworker.worker.accounts import Account, UidPool, host_account
from jobworker.worker.cgroup import CgroupTree, JobCgroup, block_device_of
from jobworker.worker.config import WorkerConfig
from jobworker.worker.job import Job, empty_cgroup
from jobworker.worker.logs import OutputStream, create_log
from jobworker.worker.models import (
    LIMIT_CONTROLLERS,
    JobSpec,
    JobStatus,
    Limits,
    Network,
    new_job_id,
    parse_job_id,
)
from jobworker.worker.notify import FileWatcher
from jobworker.worker.process import (
    Launch,
    Monitor,
    check_isolation,
    job_environment,
    resolve_program,
    spawn_job,
)
from jobworker.worker.reaper import OrphanReaper
from jobworker.worker.workdir import WorkDirs

__all__ = ["Worker"]

log = logging.getLogger(__name__)


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
        self._jobs: dict[str, Job] = {}
        self._cgroups = CgroupTree(config.cgroup_root)
        self._watcher = FileWatcher()
        self._stack = AsyncExitStack()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._logs_dir = config.data_dir / "logs"
        self._work_dirs = WorkDirs(config.data_dir / "work")
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
        self._reaper = OrphanReaper(self.owns_child) if config.reap_orphans else None

    # Lifecycle.

    async def __aenter__(self) -> Worker:
        async with AsyncExitStack() as stack:
            self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._logs_dir.mkdir(mode=0o700, exist_ok=True)
            self._work_dirs.setup()
            await check_isolation(Network.NONE)
            self._cgroups.setup()
            stack.callback(self._cgroups.teardown)
            if self._reaper is not None:
                self._reaper.install()
                stack.callback(self._reaper.uninstall)
            await stack.enter_async_context(self._watcher)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._stop_all)
            await self._reap_leftovers()
            self._io_device = self.config.io_device or block_device_of(self.config.data_dir)
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
                ", ".join(missing),
                self._cgroups.root,
                ", ".join(c for c in controllers if c not in self._cgroups.controllers) or "-",
                "; no block device for I/O limits" if self._io_device is None else "",
            )

    async def _reap_leftovers(self) -> None:
        for cgroup in self._cgroups.leftovers():
            if cgroup.populated():
                log.warning("killing the processes an earlier worker left in %s", cgroup.path)
            with anyio.fail_after(30):
                await empty_cgroup(cgroup, self._watcher)
            cgroup.remove()

    async def _stop_all(self) -> None:
        """Stop every running job and wait until all are over, even if cancelled."""
        with anyio.CancelScope(shield=True):
            assert self._task_group is not None
            running = [job for job in self._jobs.values() if not job.is_ended()]
            for job in running:
                job.request_stop(self._task_group, self.config.stop_grace)
            for job in running:
                await job.wait()

    # Capabilities.

    @property
    def enforceable_limits(self) -> frozenset[str]:
        """Names of the :class:`Limits` fields this host can enforce."""
        return self._enforceable

    @property
    def cgroup_root(self) -> Path:
        return self._cgroups.root

    # Operations.

    async def start(self, spec: JobSpec) -> JobStatus:
        """Start a job and return its first status. Nothing is left behind if it fails."""
        if self._closing or self._task_group is None:
            raise WorkerClosed("the worker is shutting down and starts no new jobs")
        spec.validate()
        limits = self._effective_limits(spec.limits)
        unenforced = frozenset(limits.items()) - self._enforceable
        job_id = new_job_id()
        work_dir = self._work_dirs.path(job_id)
        env = job_environment(job_id, str(work_dir), spec.env, os.environ)
        program = resolve_program(spec.program, env["PATH"])
        account = self._account(spec)
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
            process, cgroup = await self._launch(job_id, launch, enforced)
        except BaseException:
            self._release(account)
            raise
        job = Job(
            job_id, spec, limits, unenforced, cgroup, process, self._logs_dir / f"{job_id}.log",
            self._watcher, launch,
        )  # fmt: skip
        self._jobs[job_id] = job
        self._task_group.start_soon(self._supervise, job, process)
        log.info(
            "job %s started for %r as uid %d: %s %s (pid %d)",
            job_id, spec.owner, account.uid, program, list(spec.args), process.pid,
        )  # fmt: skip
        return job.status(usage=False)  # it has only just started: nothing to count yet

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
        if not account.name:
            self._uids.release(account.uid)

    async def _launch(
        self, job_id: str, launch: Launch, limits: Limits
    ) -> tuple[Monitor, JobCgroup]:
        """Create the job's cgroup, log and directory and start it; all or nothing."""
        cgroup = self._cgroups.create_job(job_id, limits, self._io_device)
        log_path = self._logs_dir / f"{job_id}.log"
        try:
            self._work_dirs.create(launch.work_dir, launch.account)
            output_fd = create_log(log_path)
            try:
                # Shielded: once the child exists it must become a job, whoever gave up.
                with anyio.CancelScope(shield=True), self._starting_child():
                    launch = replace(launch, cgroup=cgroup.path)
                    process = await spawn_job(launch, output_fd)
                    self._children[process.pid] = process
            finally:
                os.close(output_fd)
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await empty_cgroup(cgroup, self._watcher)
            log_path.unlink(missing_ok=True)
            self._work_dirs.remove(launch.work_dir)
            cgroup.remove()
            if isinstance(exc, OSError):
                # The program was checked already: this is the host (no pids, memory or disk
                # space left), and trying again later may work.
                log.error("cannot start a job: %s", exc)
                raise Unavailable(f"the worker cannot start a job now: {exc.strerror}") from exc
            raise
        return process, cgroup

    async def _supervise(self, job: Job, process: Monitor) -> None:
        try:
            await job.supervise()
        finally:
            if not job.account.name:
                # No process of the job is left: its uid may serve another job, which must
                # not find this job's files.
                self._work_dirs.lock(job.launch.work_dir)
            self._release(job.account)
            if self._children.get(process.pid) is process:
                del self._children[process.pid]
            if self._reaper is not None:
                # The reaper stops at a job's zombie; orphans behind it are reaped now.
                self._reaper.reap()

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
                f"this host cannot enforce {', '.join(unavailable)}: the cgroup controller is "
                "not available to the worker; leave these limits out to run without them"
            )
        limits = requested.over(self.config.default_limits)
        if over := limits.exceeding(self.config.max_limits):
            details = ", ".join(
                f"{name} {value or 'unlimited'} > {top}"
                for name, (value, top) in sorted(over.items())
            )
            raise InvalidLimits(f"limits above this worker's maximum: {details}")
        return limits

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(parse_job_id(job_id))
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    def status(self, job_id: str) -> JobStatus:
        return self._job(job_id).status()

    def list(self, owner: str | None = None) -> list[JobStatus]:
        """Every job (or every job of ``owner``), oldest first."""
        return [job.status() for job in self._jobs.values() if owner is None or job.owner == owner]

    async def stop(self, job_id: str) -> JobStatus:
        """Stop a job and return its final status once every process of it is gone.

        Stopping a job that already ended returns its final status unchanged.
        """
        job = self._job(job_id)
        if self._task_group is None:
            raise WorkerClosed("the worker is not running")
        job.request_stop(self._task_group, self.config.stop_grace)
        return await job.wait()

    def output(self, job_id: str, offset: int = 0) -> OutputStream:
        """The job's output from ``offset``, following it live until the job ends."""
        job = self._job(job_id)
        return OutputStream(
            job.log_path,
            offset,
            self.config.chunk_size,
            self._watcher,
            job.is_ended,
            job.end_waiters,
        )
