"""Waiting for files to change, with one inotify instance for the whole worker.

Every wait on a file (a log growing, ``cgroup.events`` changing) goes through
:class:`FileWatcher`. One inotify descriptor serves all of them, so the number of followers
is not bounded by ``fs.inotify.max_user_instances``; watches on the same file are shared and
reference-counted, and the kernel watch is removed when its last waiter leaves.

A waiter must be armed (``clear()``) *before* it reads the file and only then ``wait()``:
a change that happens between the read and the wait then still wakes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import anyio
from asyncinotify import Inotify, Mask, Watch

from jobworker.worker.flags import Wakeup

__all__ = ["FileWatcher", "Watched"]

log = logging.getLogger(__name__)

_MASK = Mask.MODIFY | Mask.DELETE_SELF


class Watched:
    """The waiters of one kernel watch (a handle for :meth:`FileWatcher.discard`)."""

    __slots__ = ("path", "waiters", "watch")

    def __init__(self, watch: Watch, path: Path) -> None:
        self.watch = watch
        self.path = path
        self.waiters: set[Wakeup] = set()


class FileWatcher:
    """One inotify instance and the task that fans its events out to waiters."""

    def __init__(self) -> None:
        self._inotify: Inotify | None = None
        self._by_wd: dict[int, Watched] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> FileWatcher:
        self._inotify = Inotify()
        try:
            self._task_group = await anyio.create_task_group().__aenter__()
            self._task_group.start_soon(self._dispatch)
        except BaseException:
            self._inotify.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        assert self._inotify is not None
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._inotify.close()
            for watched in self._by_wd.values():
                for waiter in watched.waiters:
                    waiter.set()
            self._by_wd.clear()

    @property
    def watch_count(self) -> int:
        """How many kernel watches are held now."""
        return len(self._by_wd)

    def add(self, path: Path, waiter: Wakeup) -> Watched:
        """Wake ``waiter`` whenever ``path`` is modified (or removed), until :meth:`discard`.

        The watch is in place when this returns, so a read that follows sees every change
        or is woken by it.
        """
        if self._inotify is None:
            raise RuntimeError("FileWatcher is not running")
        watch = self._inotify.add_watch(path, _MASK)
        watched = self._by_wd.get(watch.wd)
        if watched is None:
            watched = self._by_wd[watch.wd] = Watched(watch, path)
        watched.waiters.add(waiter)
        return watched

    def discard(self, watched: Watched, waiter: Wakeup) -> None:
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
    async def watch(self, path: Path, waiter: Wakeup | None = None) -> AsyncIterator[Wakeup]:
        """:meth:`add` for the duration of a ``with`` block; yields the waiter."""
        waiter = waiter or Wakeup()
        watched = self.add(path, waiter)
        try:
            yield waiter
        finally:
            self.discard(watched, waiter)

    async def _dispatch(self) -> None:
        assert self._inotify is not None
        async for event in self._inotify:
            watch = event.watch
            if watch is None:
                continue
            watched = self._by_wd.get(watch.wd)
            if watched is None:
                continue
            for waiter in watched.waiters:
                waiter.set()
            if Mask.IGNORED in event.mask and self._by_wd.get(watch.wd) is watched:
                # The file is gone; the kernel dropped the watch. Waiters will find out.
                del self._by_wd[watch.wd]
