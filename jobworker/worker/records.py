"""Every job a worker knows, running or ended: the job table, backed by the store.

A job's record is its :class:`~jobworker.models.JobStatus`. The table keeps every record in
memory in start order (they are small: a few hundred bytes each) and writes each change to
the :class:`~jobworker.worker.store.JobStore` before it is visible, so what a caller has
been told is on disk. A running job also has its :class:`RunningJob`, which the table drops
when the job ends; readers of the job's output subscribe to its end here.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator

from jobworker.errors import JobNotFound
from jobworker.models import JobStatus, parse_job_id
from jobworker.worker.flags import Flag
from jobworker.worker.runner import RunningJob
from jobworker.worker.store import JobStore

__all__ = ["JobTable"]

log = logging.getLogger(__name__)


class JobTable:
    """Records by job id, the running jobs among them, and their end subscriptions."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._records: dict[str, JobStatus] = {}
        self._running: dict[str, RunningJob] = {}
        self._ends: dict[str, _End] = {}
        self._running_by_owner: dict[tuple[str, str], int] = {}

    @property
    def store(self) -> JobStore:
        return self._store

    def load(self) -> list[JobStatus]:
        """Read every record from the store (at start-up), oldest first."""
        self._records = {status.id: status for status in self._store.load()}
        return list(self._records.values())

    # Changes, each written to the store first.

    def add(self, job: RunningJob) -> None:
        """A job that has just started."""
        self._store.add(job.status)
        self._records[job.id] = job.status
        self._watch(job)

    def adopt(self, job: RunningJob) -> None:
        """A recorded job still running from an earlier worker."""
        self._watch(job)

    def _watch(self, job: RunningJob) -> None:
        owner = (job.status.owner, job.status.owner_role)
        self._running_by_owner[owner] = self._running_by_owner.get(owner, 0) + 1
        self._running[job.id] = job
        self._ends[job.id] = _End()

    def update(self, status: JobStatus) -> bool:
        """A change to a job's record, such as a stop request; False if it could not be
        written to the store (the disk is full): it holds in memory, and a later server
        finds the job as it was last written."""
        self._records[status.id] = status
        try:
            self._store.update(status)
        except sqlite3.Error as exc:
            log.error("job %s: its record could not be saved: %s", status.id, exc)
            return False
        return True

    def finish(self, final: JobStatus) -> bool:
        """A job has ended: record its final status and tell everyone waiting. False if the
        record could not be saved."""
        saved = self.update(final)
        if self._running.pop(final.id, None) is not None:
            owner = (final.owner, final.owner_role)
            self._running_by_owner[owner] -= 1
            if not self._running_by_owner[owner]:
                del self._running_by_owner[owner]
        end = self._ends.pop(final.id, None)
        if end is not None:
            end.final = final
            end.set()
            for callback in list(end.callbacks or ()):
                callback()
        return saved

    def remove(self, job_id: str) -> None:
        """Forget an ended job (removed from the store first)."""
        self._store.remove(job_id)
        del self._records[job_id]

    # Lookups.

    def record(self, job_id: str) -> JobStatus:
        """The record of ``job_id`` (any case), or :class:`JobNotFound`."""
        status = self._records.get(parse_job_id(job_id))
        if status is None:
            raise JobNotFound(f"no job {job_id}")
        return status

    def get(self, job_id: str) -> JobStatus:
        """The job's status now: a running job's with what the kernel has counted so far."""
        status = self.record(job_id)
        job = self._running.get(status.id)
        return job.snapshot() if job is not None else status

    def running_count(self, owner: str, owner_role: str) -> int:
        return self._running_by_owner.get((owner, owner_role), 0)

    def running(self, job_id: str) -> RunningJob | None:
        return self._running.get(parse_job_id(job_id))

    def all(self) -> list[JobStatus]:
        """Every job's status, oldest first."""
        return [
            job.snapshot() if (job := self._running.get(job_id)) is not None else status
            for job_id, status in self._records.items()
        ]

    def ended(self) -> list[JobStatus]:
        """The records of the jobs that have ended, oldest first (no cgroup is read)."""
        return [status for job_id, status in self._records.items() if job_id not in self._running]

    def ids(self) -> set[str]:
        return set(self._records)

    def running_jobs(self) -> Iterator[RunningJob]:
        return iter(list(self._running.values()))

    def is_ended(self, job_id: str) -> bool:
        return job_id not in self._running

    def end_callbacks(self, job_id: str) -> set[Callable[[], object]]:
        """What to call as the end of ``job_id`` is recorded, before anything else runs (add
        and discard; for a job that has ended, a set that nothing calls)."""
        end = self._ends.get(job_id)
        if end is None:
            return set()
        if end.callbacks is None:
            end.callbacks = set()
        return end.callbacks

    async def wait_end(self, job_id: str) -> JobStatus:
        """The final status of ``job_id``, once recorded (even if the job is removed
        at once, by retention)."""
        end = self._ends.get(job_id)
        if end is None:
            return self._records[job_id]
        await end.wait()
        assert end.final is not None
        return end.final


class _End(Flag):
    """Set when a job's end is recorded; holds its final status and the end callbacks."""

    __slots__ = ("callbacks", "final")

    def __init__(self) -> None:
        super().__init__()
        self.final: JobStatus | None = None
        self.callbacks: set[Callable[[], object]] | None = None
