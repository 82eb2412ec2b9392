"""Waiting for files to change, with one inotify instance for the whole worker.

Every wait on a file (a log growing, ``cgroup.events`` changing) goes through
:class:`FileWatcher`. One inotify descriptor serves all of them, so the number of followers
is not bounded by ``fs.inotify.max_user_instances``; watches on the same file are shared and
reference-counted, and the kernel watch is removed when its last waiter leaves.

A waiter must be armed (``clear()``) *before* it reads the file and only then ``wait()``:
a change that happens between the read and the wait then still wakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from asyncinotify import Inotify, Mask, Watch

from jobworker.worker.flags import Flag

__all__ = ["BATCH", "FileWatcher", "Waiter", "Watched"]

log = logging.getLogger(__name__)

_MASK = Mask.MODIFY | Mask.DELETE_SELF
#: Events handled in one turn of the event loop; the rest wait for the next turn, so that
#: files that change all the time cannot keep the loop from everything else.
BATCH: Final = 256


class Waiter(Protocol):
    """What an event wakes: a :class:`Flag`, or anything else with ``set()``, which is
    called from the event loop's reader callback and must not block."""

    def set(self) -> None: ...


class Watched:
    """The waiters of one kernel watch (a handle for :meth:`FileWatcher.discard`)."""

    __slots__ = ("waiters", "watch")

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.waiters: set[Waiter] = set()


class FileWatcher:
    """One inotify instance, read by the event loop whenever it is readable, and the
    waiters its events wake."""

    def __init__(self) -> None:
        self._inotify: Inotify | None = None
        self._by_wd: dict[int, Watched] = {}

    async def __aenter__(self) -> FileWatcher:
        self._inotify = Inotify()
        try:
            # asyncinotify asks for IN_NONBLOCK but passes IN_CLOEXEC's value (4.x): the
            # descriptor comes blocking, and _dispatch reads until it would block.
            os.set_blocking(self._inotify.fd, False)
            # A reader callback, not a task: an event wakes its waiters in the same pass of
            # the event loop, and the descriptor stays registered between events.
            asyncio.get_running_loop().add_reader(self._inotify.fd, self._dispatch)
        except BaseException:
            self._inotify.close()
            self._inotify = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        inotify, self._inotify = self._inotify, None
        assert inotify is not None
        try:
            asyncio.get_running_loop().remove_reader(inotify.fd)
        finally:
            inotify.close()
            for watched in list(self._by_wd.values()):  # a waiter may leave as it is woken
                for waiter in tuple(watched.waiters):
                    waiter.set()
            self._by_wd.clear()

    @property
    def watch_count(self) -> int:
        """How many kernel watches are held now."""
        return len(self._by_wd)

    def add(self, path: Path, waiter: Waiter) -> Watched:
        """Wake ``waiter`` whenever ``path`` is modified (or removed), until :meth:`discard`.

        The watch is in place when this returns, so a read that follows sees every change
        or is woken by it.
        """
        if self._inotify is None:
            raise RuntimeError("FileWatcher is not running")
        watch = self._inotify.add_watch(path, _MASK)
        watched = self._by_wd.get(watch.wd)
        if watched is None:
            watched = self._by_wd[watch.wd] = Watched(watch)
        watched.waiters.add(waiter)
        return watched

    def discard(self, watched: Watched, waiter: Waiter) -> None:
        """Stop waking ``waiter``; the kernel watch goes with the file's last waiter."""
        watched.waiters.discard(waiter)
        wd = watched.watch.wd
        if not watched.waiters and self._by_wd.get(wd) is watched:
            del self._by_wd[wd]
            if self._inotify is not None:
                # OSError: the file is already gone, and the kernel dropped the watch.
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(watched.watch)

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
        inotify = self._inotify
        if inotify is None:
            return  # closed while a turn was due
        for _ in range(BATCH):
            try:
                event = inotify.sync_get()  # the descriptor is non-blocking
            except BlockingIOError:
                return
            if event is None:
                return
            watch = event.watch
            if watch is None:
                continue
            watched = self._by_wd.get(watch.wd)
            if watched is None:
                continue
            for waiter in tuple(watched.waiters):  # a waiter may leave as it is woken
                waiter.set()
            if Mask.IGNORED in event.mask and self._by_wd.get(watch.wd) is watched:
                # The file is gone; the kernel dropped the watch. Waiters will find out.
                del self._by_wd[watch.wd]
        # More may be queued, some of them read already into asyncinotify's buffer, where
        # the descriptor's readiness does not show them: the next turn goes on, after
        # everything else that is ready now.
        asyncio.get_running_loop().call_soon(self._dispatch)
