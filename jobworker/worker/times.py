"""When a job's output was written: each log's time index.

A job writes straight into its log, so the worker sees no single write. It watches each
running job's log instead (inotify) and, when the log has grown, appends a *point* to the
log's index file: ``(size, time)``, meaning every byte before ``size`` had been written by
``time``. A byte's time is that of the first point past it.

Points are rationed like tokens in a bucket: a point is taken at once while the job has
written no more than :data:`BURST` times in a row, or :data:`RATE` times a second on average,
so a line that a job writes now and then is stamped within about a millisecond. Beyond that
the recorder stops watching and takes the next point when the next token is due: a job that
writes constantly costs the server a few wake-ups and 16-byte appends a second, and a quiet
job costs nothing. So that a job that writes for months does not grow a large index, the
rate halves with every :data:`POINTS_PER_STEP` points (after about 4.5 hours of constant
output); the index grows with the logarithm of the run time.

The index (``<job id>.times`` beside the log) is a sequence of records of two little-endian
unsigned 64-bit numbers: the log's size, and the time in nanoseconds since the Unix epoch.
It is only ever appended to, with no descriptor held between appends. A server that adopts
a running job goes on where the last one stopped; output written while no server ran gets
the time the next one adopted it. The record is best effort: if an append fails, the job
runs on and its later output has no times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from pathlib import Path
from typing import Final

from jobworker.worker.notify import FileWatcher, Watched

__all__ = ["BURST", "POINTS_PER_STEP", "RATE", "TimeIndex", "TimeRecorder", "index_path"]

log = logging.getLogger(__name__)

#: Points a second, on average, of a log that grows all the time.
RATE: Final = 4
#: Points taken at once after a quiet spell.
BURST: Final = 8
#: The rate halves after this many points (1 MiB of index).
POINTS_PER_STEP: Final = 65536

_TOKEN_NS: Final = 1_000_000_000 // RATE

_RECORD: Final = struct.Struct("<QQ")
# Records a reader reads at a time.
_BLOCK: Final = 64


def index_path(log_path: Path) -> Path:
    """Where the time index of the log ``log_path`` lives."""
    return log_path.with_suffix(".times")


def _append(path: Path, size: int, at_ns: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, _RECORD.pack(size, at_ns))
    finally:
        os.close(fd)


class TimeRecorder:
    """Keeps one running job's time index while the job runs (see the module docstring).

    :meth:`start` begins, :meth:`finish` takes the last point as the job's end is recorded,
    :meth:`close` stops without one (a worker that leaves the job running for the next).
    """

    __slots__ = (
        "_closed",
        "_filled_ns",
        "_index",
        "_log_path",
        "_points",
        "_size",
        "_timer",
        "_tokens",
        "_watched",
        "_watcher",
    )

    def __init__(self, log_path: Path, watcher: FileWatcher) -> None:
        self._log_path = log_path
        self._index = index_path(log_path)
        self._watcher = watcher
        self._watched: Watched | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._size = 0
        self._points = 0
        self._tokens = float(BURST)
        self._filled_ns = time.time_ns()
        self._closed = False

    def start(self) -> None:
        """Take up the index where it ends (a new job has none), note what the log holds
        now, and watch it."""
        try:
            with self._index.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                self._points = end // _RECORD.size
                if self._points:
                    f.seek((self._points - 1) * _RECORD.size)
                    self._size = _RECORD.unpack(f.read(_RECORD.size))[0]
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._give_up(exc)
            return
        self._attach()  # watch, then look: a write in between still wakes the recorder
        self._sample(time.time_ns())

    def finish(self) -> None:
        """The job has ended and nothing writes to its log any more: the last point."""
        if not self._closed:
            self._sample(time.time_ns())
        self.close()

    def close(self) -> None:
        """Stop watching, without a last point."""
        self._closed = True
        self._detach()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def set(self) -> None:
        """The log changed (called by the file watcher, or by a reader that found output
        the index does not reach yet): a point now if a token is left, else stop watching
        until the next one is due."""
        if self._closed or self._timer is not None:
            return  # ended, or a point is due already
        now = time.time_ns()
        token_ns = _TOKEN_NS << (self._points // POINTS_PER_STEP)
        self._tokens = min(BURST, self._tokens + (now - self._filled_ns) / token_ns)
        self._filled_ns = now
        if self._tokens >= 1:
            self._sample(now)
            return
        self._detach()
        wait = (1 - self._tokens) * token_ns / 1e9
        self._timer = asyncio.get_running_loop().call_later(wait, self._due)

    def _due(self) -> None:
        """A token is due: the point for what was written meanwhile, and watch again."""
        self._timer = None
        if self._closed:
            return
        self._attach()
        self.set()

    def _sample(self, now: int) -> None:
        """Append a point if the log has grown since the last one (which costs a token)."""
        try:
            size = os.stat(self._log_path).st_size
            if size <= self._size:
                return
            _append(self._index, size, now)
        except OSError as exc:
            self._give_up(exc)
            return
        self._size = size
        self._points += 1
        self._tokens -= 1

    def _attach(self) -> None:
        if self._watched is None and not self._closed:
            try:
                self._watched = self._watcher.add(self._log_path, self)
            except OSError as exc:
                self._give_up(exc)

    def _detach(self) -> None:
        if self._watched is not None:
            self._watcher.discard(self._watched, self)
            self._watched = None

    def _give_up(self, exc: OSError) -> None:
        if not self._closed:
            log.warning("%s: no longer recording when output is written: %s", self._index, exc)
        self.close()


class TimeIndex:
    """A reader's view of a log's time index: the points just past where it reads.

    A reader moves forward only, so it holds a few points (:data:`_BLOCK` records) and reads
    the next ones when it passes them, finding its first one by binary search: however long
    the index, a reader costs about a kilobyte. Half a record (an append in progress) is
    left for later.
    """

    __slots__ = ("_next", "_path", "_points", "_positioned")

    def __init__(self, log_path: Path) -> None:
        self._path = index_path(log_path)
        self._points: deque[tuple[int, int]] = deque()
        self._next = 0  # the number of the next record to read
        self._positioned = False

    def point_after(self, offset: int) -> tuple[int, int] | None:
        """The first point past the byte at ``offset``: ``(size, time in ns)``; None if the
        index does not reach it (yet)."""
        points = self._points
        while True:
            while points and points[0][0] <= offset:
                points.popleft()
            if points:
                return points[0]
            if not self._read(offset):
                return None

    def _read(self, offset: int) -> bool:
        """Read the next block of points (the first time, from the first point past
        ``offset``); whether there were any."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # none (yet), or unreadable: no times, as if none were recorded
            return False
        try:
            if not self._positioned:
                self._next = _first_past(fd, offset)
                self._positioned = True
            data = os.pread(fd, _BLOCK * _RECORD.size, self._next * _RECORD.size)
        except OSError:
            return False
        finally:
            os.close(fd)
        count = len(data) // _RECORD.size
        last = self._points[-1][0] if self._points else -1
        for size, at_ns in _RECORD.iter_unpack(data[: count * _RECORD.size]):
            if size > last:  # sizes only grow; anything else is not a point
                self._points.append((size, at_ns))
                last = size
        self._next += count
        return count > 0


def _first_past(fd: int, offset: int) -> int:
    """The number of the first record of the index ``fd`` whose size is past ``offset``."""
    lo, hi = 0, os.fstat(fd).st_size // _RECORD.size
    while lo < hi:
        mid = (lo + hi) // 2
        size = _RECORD.unpack(os.pread(fd, _RECORD.size, mid * _RECORD.size))[0]
        if size <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo
