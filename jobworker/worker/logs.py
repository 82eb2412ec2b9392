"""A job's output: one append-only log file, and readers that follow it.

The job writes its stdout and stderr straight into the log file; the worker never copies or
buffers output in memory. A reader (:class:`OutputStream`) reads from its offset to the end
of the file, then sleeps until inotify says the file grew or the job ended, and repeats. It
ends once the job has ended and every byte has been read. Each reader has its own file
descriptor and offset, so any number of them can follow one job independently.

A job with an output cap has holes in its log where bytes were dropped (``holes.py``). A
reader never returns them as zeros: it reads only up to the next hole, and where its offset
lies in a hole it returns one gap chunk (``OutputChunk.dropped``) that skips to where data
resumes (``SEEK_DATA``).

A reader asked for timestamps stamps each chunk with when its data had been written, from the
log's time index (``times.py``): a chunk then ends at the index's next point, so that one time
holds for all of it. Where the index does not reach yet, the reader has the job's recorder
take a point at once (as the next inotify event would); if the recorder's rate does not
allow one, the data was written by the time it is read.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from jobworker.errors import InvalidOffset
from jobworker.models import OutputChunk
from jobworker.worker.flags import Flag
from jobworker.worker.holes import next_data, next_hole
from jobworker.worker.notify import FileWatcher, Watched
from jobworker.worker.times import TimeIndex

__all__ = ["OutputStream", "create_log"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def create_log(path: Path) -> int:
    """Create a new, empty log file and return a descriptor the job writes through."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)


class OutputStream:
    """Chunks of a job's output from ``offset``, live until the job ends.

    Use it as ``async with worker.output(job_id) as stream: async for chunk in stream``.
    Leaving the ``async with`` (normally, by error or by cancellation) releases the file and
    the inotify watch at once.

    A reader that has caught up with a running job closes its file while it waits: an idle
    follower holds an inotify watch, not a descriptor. It opens the log again when the job
    writes, or at once when the job ends (``end_callbacks`` run as the end is recorded,
    before anything can remove an ended job's log), so it always reads to the end.
    """

    def __init__(
        self,
        path: Path,
        offset: int,
        chunk_size: int,
        watcher: FileWatcher,
        ended: Callable[[], bool],
        end_callbacks: set[Callable[[], object]],
        timestamps: bool = False,
        note_time: Callable[[], None] | None = None,
    ) -> None:
        if offset < 0:
            raise InvalidOffset(f"offset must not be negative, not {offset}")
        self._path = path
        self._offset = offset
        self._chunk_size = chunk_size
        self._watcher = watcher
        self._ended = ended
        self._end_callbacks = end_callbacks
        self._waiter = Flag()
        self._watched: Watched | None = None
        self._fd = -1
        self._times = TimeIndex(path) if timestamps else None
        self._note_time = note_time

    @property
    def offset(self) -> int:
        """Where the next chunk starts."""
        return self._offset

    async def __aenter__(self) -> OutputStream:
        try:
            # Watch first, then read: a write between the two still wakes this reader.
            self._end_callbacks.add(self._job_ended)
            self._watched = self._watcher.add(self._path, self._waiter)
            self._open()
            if self._ended():
                size = os.fstat(self._fd).st_size
                if self._offset > size:
                    raise InvalidOffset(
                        f"offset {self._offset} is past the end of the output ({size} bytes)"
                    )
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    async def aclose(self) -> None:
        """Release the file and the watch. Safe to call more than once."""
        self._release()

    def _release(self) -> None:
        self._end_callbacks.discard(self._job_ended)
        if self._watched is not None:
            self._watcher.discard(self._watched, self._waiter)
            self._watched = None
        self._close()

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _job_ended(self) -> None:
        """The job's end is being recorded: hold the log open from now on (if that fails,
        the next read opens it again and says why)."""
        with contextlib.suppress(OSError):
            self._open()
        self._waiter.set()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> OutputChunk:
        if self._watched is None:
            raise StopAsyncIteration
        while True:
            # Arm before reading; decide "ended" before the read that may find nothing.
            self._waiter.clear()
            ended = self._ended()
            self._open()  # after a wait: the job is running, or its end opened it
            chunk = self._read(ended)
            if chunk is not None:
                self._offset = chunk.end
                return chunk
            if ended:
                raise StopAsyncIteration
            self._close()
            await self._waiter.wait()

    def _read(self, ended: bool) -> OutputChunk | None:
        """The data (or the gap) at the offset now, or None if the output ends there."""
        offset = self._offset
        resume = next_data(self._fd, offset)
        if resume is None:
            return None
        if resume > offset:
            return OutputChunk(offset, b"", dropped=resume - offset)
        size = min(self._chunk_size, next_hole(self._fd, offset) - offset)
        if self._times is None:
            data = os.pread(self._fd, size, offset)
            return OutputChunk(offset, data) if data else None
        point = self._times.point_after(offset)
        if point is None and not ended and self._note_time is not None:
            self._note_time()  # its recorder takes a point now, if its rate allows
            point = self._times.point_after(offset)
        if point is not None:
            size = min(size, point[0] - offset)
            at_ns: int | None = point[1]
        else:  # not in the index yet: written by now (of an ended job: not recorded)
            at_ns = None if ended else time.time_ns()
        data = os.pread(self._fd, size, offset)
        if not data:
            return None
        written_at = None if at_ns is None else _EPOCH + timedelta(microseconds=at_ns // 1000)
        return OutputChunk(offset, data, written_at=written_at)
