"""Waiting for files to change, with one inotify instance for the whole worker.

Every wait on a file (a log growing, ``cgroup.events`` changing) goes through
:class:`FileWatcher`. One inotify descriptor serves all of them, so the number of followers
is not bounded by ``fs.inotify.max_user_instances``; watches on the same file are shared and
reference-counted, and the kernel watch is removed when its last waiter leaves.

A waiter must be armed (``clear()``) *before* it reads the file and only then ``wait()``:
a change that happens between the read and the wait then still wakes it.

The watcher calls inotify through libc and reads its events itself, in the event loop's
reader callback: an event is a 16-byte record that names a watch, and all the watcher needs
from it is which waiters to wake. (asyncinotify, which it used before, built an event
object, a flag enum and a weak reference for each, on the path of every line a follower
receives: docs/performance.md.)
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from jobworker.worker.flags import Flag
from jobworker.worker.libc import checked, libc

__all__ = ["BATCH", "FileWatcher", "Waiter", "Watched"]

log = logging.getLogger(__name__)

# <sys/inotify.h>
_IN_MODIFY: Final = 0x002
_IN_DELETE_SELF: Final = 0x400
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_MASK: Final = _IN_MODIFY | _IN_DELETE_SELF
_EVENT: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name
_LONGEST_EVENT: Final = _EVENT.size + 256  # with a name of NAME_MAX bytes and its NUL

# At most one warning this often while the kernel's event queue keeps overflowing.
_OVERFLOW_LOG_EVERY: Final = 60.0

#: Events handled in one turn of the event loop; the rest wait for the next turn, so that
#: files that change all the time cannot keep the loop from everything else.
BATCH: Final = 256
# Watches are on files, whose events carry no name: one read takes at most BATCH events.
_READ_SIZE: Final = BATCH * _EVENT.size

_inotify_init1 = libc.inotify_init1
_inotify_init1.argtypes = (ctypes.c_int,)
_inotify_init1.restype = ctypes.c_int
_inotify_add_watch = libc.inotify_add_watch
_inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_inotify_add_watch.restype = ctypes.c_int
_inotify_rm_watch = libc.inotify_rm_watch
_inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
_inotify_rm_watch.restype = ctypes.c_int


class Waiter(Protocol):
    """What an event wakes: a :class:`Flag`, or anything else with ``set()``, which is
    called from the event loop's reader callback and must not block."""

    def set(self) -> None: ...


class Watched:
    """The waiters of one kernel watch (a handle for :meth:`FileWatcher.discard`)."""

    __slots__ = ("waiters", "wd")

    def __init__(self, wd: int) -> None:
        self.wd = wd
        self.waiters: set[Waiter] = set()


class FileWatcher:
    """One inotify instance, read by the event loop whenever it is readable, and the
    waiters its events wake."""

    def __init__(self) -> None:
        self._fd = -1
        self._by_wd: dict[int, Watched] = {}
        self._overflows = 0
        self._overflow_logged = -_OVERFLOW_LOG_EVERY

    async def __aenter__(self) -> FileWatcher:
        fd = checked(_inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        try:
            # A reader callback, not a task: an event wakes its waiters in the same pass of
            # the event loop, and the descriptor stays registered between events.
            asyncio.get_running_loop().add_reader(fd, self._dispatch)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, -1
        try:
            asyncio.get_running_loop().remove_reader(fd)
        finally:
            os.close(fd)
            self._wake_all()
            self._by_wd.clear()

    @property
    def watch_count(self) -> int:
        """How many kernel watches are held now."""
        return len(self._by_wd)

    def add(self, path: Path, waiter: Waiter) -> Watched:
        """Wake ``waiter`` whenever ``path`` is modified (or removed), until :meth:`discard`.

        The watch is in place when this returns, so a read that follows sees every change
        or is woken by it. Raises :class:`OSError` (``FileNotFoundError`` and so on) if
        ``path`` cannot be watched.
        """
        if self._fd < 0:
            raise RuntimeError("FileWatcher is not running")
        encoded = os.fsencode(path)
        if b"\0" in encoded:
            raise ValueError(f"embedded null byte in the path {path!r}")
        wd = checked(_inotify_add_watch(self._fd, encoded, _MASK), path)
        watched = self._by_wd.get(wd)
        if watched is None:
            watched = self._by_wd[wd] = Watched(wd)
        watched.waiters.add(waiter)
        return watched

    def discard(self, watched: Watched, waiter: Waiter) -> None:
        """Stop waking ``waiter``; the kernel watch goes with the file's last waiter."""
        watched.waiters.discard(waiter)
        wd = watched.wd
        if not watched.waiters and self._by_wd.get(wd) is watched:
            del self._by_wd[wd]
            if self._fd >= 0:
                # Fails (EINVAL) if the file is gone and the kernel dropped the watch already.
                _inotify_rm_watch(self._fd, wd)

    @asynccontextmanager
    async def watch(self, path: Path, waiter: Flag | None = None) -> AsyncIterator[Flag]:
        """:meth:`add` for the duration of a ``with`` block; yields the waiter."""
        waiter = waiter or Flag()
        watched = self.add(path, waiter)
        try:
            yield waiter
        finally:
            self.discard(watched, waiter)

    def _dispatch(self) -> None:
        """Wake the waiters of every file that changed, for up to :data:`BATCH` events queued
        now; if there may be more, go on in the loop's next turn."""
        if self._fd < 0:
            return  # closed while a turn was due
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        by_wd = self._by_wd
        end = len(data)
        at = 0
        while at < end:
            wd, mask, _cookie, name_size = _EVENT.unpack_from(data, at)
            at += _EVENT.size + name_size
            if mask & _IN_Q_OVERFLOW:
                # The kernel's queue was full and events were lost: wake everyone, and
                # each waiter looks at its file again.
                self._overflowed()
                continue
            watched = by_wd.get(wd)
            if watched is None:
                continue
            for waiter in tuple(watched.waiters):  # a waiter may leave as it is woken
                waiter.set()
            if mask & _IN_IGNORED and by_wd.get(wd) is watched:
                # The file is gone; the kernel dropped the watch. Waiters will find out.
                del by_wd[wd]
        if _READ_SIZE - end < _LONGEST_EVENT:
            # The read may have stopped for want of room: look again in the next turn,
            # after everything else that is ready now.
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _overflowed(self) -> None:
        self._overflows += 1
        now = time.monotonic()
        if now - self._overflow_logged >= _OVERFLOW_LOG_EVERY:
            log.warning(
                "inotify's event queue overflowed (%d times since the last warning): the "
                "server fell behind files that change very often; every waiter was woken to "
                "look again. Raising fs.inotify.max_queued_events gives it more room",
                self._overflows,
            )
            self._overflows = 0
            self._overflow_logged = now
        self._wake_all()

    def _wake_all(self) -> None:
        for watched in list(self._by_wd.values()):  # a waiter may leave as it is woken
            for waiter in tuple(watched.waiters):
                waiter.set()
