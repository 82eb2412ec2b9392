"""Bounded logs: dropping the middle of a file while keeping every offset where it was.

A job writes its log through an ``O_APPEND`` descriptor as fast as it likes. Once the log
holds more than its cap, :class:`OutputCap` keeps the first part (the *head*, half the cap)
and the latest part (the *tail*), and frees the disk blocks in between by punching a hole
(``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``). The file's size does not
change, so byte N of the output stays at offset N, and the writer keeps appending after the
punch. A log is only ever appended to, so its holes are exactly the ranges that were dropped:
readers find them with ``SEEK_HOLE`` and ``SEEK_DATA`` (:func:`next_hole`, :func:`next_data`),
and a later server finds them the same way.

Holes are punched in whole :data:`ALIGN` units: a partial block would be zeroed, not freed,
and zeros must never be served as output.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Final

from jobworker.models import MAX_OUTPUT_RANGE
from jobworker.worker.libc import checked, libc

__all__ = [
    "ALIGN",
    "OutputCap",
    "dropped_bytes",
    "next_data",
    "next_hole",
    "punch_hole",
]

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02

#: The unit holes are punched in: a multiple of every common filesystem's block size.
ALIGN: Final = 64 * 1024


_fallocate = libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset + length)`` in the file open for writing as
    ``fd``; its size stays. Raises :class:`OSError` (``EOPNOTSUPP`` on a filesystem without
    hole punching)."""
    if length <= 0:
        return
    checked(_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length))


def next_data(fd: int, offset: int) -> int | None:
    """Where data resumes at or after ``offset``; None if there is none up to the end."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def next_hole(fd: int, offset: int) -> int:
    """Where the next hole starts at or after ``offset`` (the file's end counts as one)."""
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return offset  # at or past the end
        raise


def dropped_bytes(fd: int) -> int:
    """How many bytes of the file are holes below its last byte of data."""
    size = os.fstat(fd).st_size
    dropped = 0
    offset = 0
    while offset < size:
        hole = next_hole(fd, offset)
        if hole >= size:
            break
        data = next_data(fd, hole)
        if data is None:
            break  # a hole that runs to the end: nothing after it was written yet
        dropped += data - hole
        offset = data
    return dropped


def _align_down(value: int) -> int:
    return value - value % ALIGN


def _align_up(value: int) -> int:
    return _align_down(value + ALIGN - 1)


class OutputCap:
    """Keeps one log file within ``max_output`` bytes of disk: its head and its tail.

    Call :meth:`trim` whenever the log may have grown (the worker calls it on the log's
    inotify events and once more when the job has ended). It never waits for the writer and
    never reads the data. After a trim the log holds at most ``max_output`` bytes of data
    plus its last, partial block.
    """

    def __init__(self, path: Path, max_output: int) -> None:
        low, high = MAX_OUTPUT_RANGE
        if not low <= max_output <= high:
            raise ValueError(f"an output cap must be {low} to {high} bytes, not {max_output}")
        self.max_output = max_output
        self.head = _align_down(max_output // 2)
        self._tail = max_output - self.head
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        # A log taken over from an earlier server may have been trimmed already.
        data = next_data(self._fd, self.head) if next_hole(self._fd, 0) == self.head else None
        self.dropped_to = data if data is not None else self.head

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def dropped(self) -> tuple[int, int] | None:
        """The range of offsets dropped so far, if any."""
        return (self.head, self.dropped_to) if self.dropped_to > self.head else None

    def trim(self) -> int:
        """Drop what lies between the head and the tail now; return the bytes dropped now."""
        size = os.fstat(self._fd).st_size
        end = _align_up(size - self._tail)
        if end <= self.dropped_to:
            return 0
        punch_hole(self._fd, self.dropped_to, end - self.dropped_to)
        dropped, self.dropped_to = end - self.dropped_to, end
        return dropped
