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
from bisect import bisect_right
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
        self._sample(time.time_ns())
        self._attach()

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
        """The log changed (called by the file watcher): a point now if a token is left,
        else stop watching until the next one is due."""
        if self._closed:
            return
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
    """A reader's view of a log's time index, read as far as it has been written."""

    __slots__ = ("_path", "_read_to", "_sizes", "_times")

    def __init__(self, log_path: Path) -> None:
        self._path = index_path(log_path)
        self._sizes: list[int] = []
        self._times: list[int] = []
        self._read_to = 0

    def point_after(self, offset: int) -> tuple[int, int] | None:
        """The first point past the byte at ``offset``: ``(size, time in ns)``; None if the
        index does not reach it (yet)."""
        i = bisect_right(self._sizes, offset)
        if i == len(self._sizes):
            self._read_more()
            i = bisect_right(self._sizes, offset)
            if i == len(self._sizes):
                return None
        return self._sizes[i], self._times[i]

    def _read_more(self) -> None:
        try:
            with self._path.open("rb") as f:
                f.seek(self._read_to)
                data = f.read()
        except OSError:  # none (yet), or unreadable: no times, as if none were recorded
            return
        whole = len(data) - len(data) % _RECORD.size  # an append in progress: later
        for size, at_ns in _RECORD.iter_unpack(data[:whole]):
            if not self._sizes or size > self._sizes[-1]:
                self._sizes.append(size)
                self._times.append(at_ns)
        self._read_to += whole
