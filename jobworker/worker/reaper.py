"""Reaping orphans, as a child subreaper (and PID 1 of a container) must.

When a job's process leaves a child behind (a daemon, a ``sh -c 'cmd &'``), the kernel gives
that child a new parent: the nearest ancestor that is a *child subreaper*, else the PID
namespace's init. ``jobworker serve`` is a child subreaper (:func:`set_child_subreaper`), and
PID 1 of a container is init: either way those orphans become its children, and each one that
exits stays a zombie until its parent collects its exit status.

The parent also has children of its own whose exit status belongs to someone else: every
job's main process is waited for by asyncio's child watcher (on Python 3.11 a thread calling
``waitpid(pid)``, on 3.12+ a pidfd). Reaping one of those would steal its exit status (asyncio
then reports 255 and a warning) — so :class:`OrphanReaper` never calls ``wait(-1)``:

1. it *peeks* at a waitable child with ``waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)``, which
   leaves the child a zombie;
2. if that child is *protected* (the predicate says its status belongs to someone else), it
   stops: the owner will reap it, and whoever owns it runs :meth:`OrphanReaper.reap` again
   afterwards (the peek cannot look past it);
3. otherwise it reaps exactly that pid with ``waitid(P_PID, pid, WEXITED | WNOHANG)`` and goes
   back to 1, until no child is waitable.

It runs on every SIGCHLD (``loop.add_signal_handler``: in the event loop's thread, never
concurrently with the code that starts jobs) and whenever its owner calls :meth:`reap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable
from typing import Final

from jobworker.errors import ConfigError
from jobworker.worker.libc import checked, libc

__all__ = ["OrphanReaper", "is_child_subreaper", "set_child_subreaper"]

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37


def _prctl(option: int, arg: ctypes.c_ulong | ctypes._CArgObject) -> None:
    zero = ctypes.c_ulong(0)
    checked(libc.prctl(ctypes.c_int(option), arg, zero, zero, zero))


def set_child_subreaper(enabled: bool = True) -> None:
    """Make this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), or stop."""
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(enabled)))
    except OSError as exc:
        raise ConfigError(f"cannot become a child subreaper: {exc.strerror}") from exc


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper."""
    flag = ctypes.c_int(0)
    _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
    return flag.value != 0


class OrphanReaper:
    """Collects the exit status of every child that ``protected(pid)`` does not claim.

    ``protected`` must return True for every child whose exit status someone else waits for
    (and for any pid while such a child is being started and its pid is not known yet). Its
    owner must call :meth:`reap` again once a protected child has been reaped by its waiter.
    """

    def __init__(self, protected: Callable[[int], bool]) -> None:
        self._protected = protected
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reaped = 0

    def reap(self) -> list[tuple[int, int]]:
        """Reap every unprotected zombie child now; returns ``(pid, wait status)`` pairs.

        Stops early at a protected zombie (it is first in the kernel's list until its owner
        reaps it).
        """
        done: list[tuple[int, int]] = []
        while True:
            try:
                peeked = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break  # no children at all
            if peeked is None or peeked.si_pid == 0:
                break  # children, but none has exited
            pid = peeked.si_pid
            if self._protected(pid):
                break
            try:
                result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                continue  # already gone (cannot happen while we run in the loop's thread)
            if result is not None:
                done.append((pid, _wait_status(result)))
        if done:
            self.reaped += len(done)
            log.debug("reaped orphaned processes: %s", ", ".join(str(pid) for pid, _ in done))
        return done

    def install(self) -> None:
        """Reap on every SIGCHLD from now on (needs a running loop in the main thread)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._loop = loop
        self.reap()  # orphans that exited before the handler existed

    def uninstall(self) -> None:
        """Stop reaping on SIGCHLD (after one last pass)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None
        self.reap()


def _wait_status(info: os.waitid_result) -> int:
    """The exit code, or minus the signal number, as ``Popen.returncode`` puts it."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status
