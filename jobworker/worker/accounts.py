"""Who a job runs as: a uid of its own from the worker's range, or a named host account.

A uid from the range (:class:`UidPool`) belongs to one running job at a time and is handed
out round robin, so a uid comes back into use as late as possible. A uid or gid that the
host's user or group database knows (``getpwuid``, ``getgrgid``) is never handed out: it
would give the job that account's files. Each uid is looked up the first time it would be
handed out; an account added later inside the range is the operator's to avoid.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import pwd
from dataclasses import dataclass

from jobworker.errors import ConfigError, Unavailable

__all__ = ["Account", "UidPool", "host_account"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    """The identity a job's processes have. ``name`` is ``""`` for a uid of the worker's."""

    name: str
    uid: int
    gid: int


def host_account(name: str) -> Account:
    """The host account ``name`` (its uid and primary gid), or :class:`ConfigError`."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"there is no account {name!r} on this host") from None
    return Account(name, entry.pw_uid, entry.pw_gid)


def _known_to_host(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        pass
    else:
        return True
    try:
        grp.getgrgid(uid)
    except KeyError:
        return False
    return True


class UidPool:
    """The uids ``first..last`` (inclusive), each given to at most one running job."""

    def __init__(self, first: int, last: int) -> None:
        self._first = first
        self._size = last - first + 1
        self._next = 0
        self._in_use: set[int] = set()
        self._free_of_host: set[int] = set()  # looked up once: no host user or group
        self._warned: set[int] = set()

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)

    def acquire(self) -> Account:
        """A uid (and the gid of the same number) that no running job has."""
        for step in range(self._size):
            uid = self._first + (self._next + step) % self._size
            if uid in self._in_use:
                continue
            if not self._check(uid):
                continue
            self._next = (uid - self._first + 1) % self._size
            self._in_use.add(uid)
            self._check_soon(self._first + self._next)
            return Account("", uid, uid)
        raise Unavailable(
            f"every one of the worker's {self._size} job uids is in use by a running job; "
            "try again when a job has ended"
        )

    def _check(self, uid: int) -> bool:
        """Whether ``uid`` is free of host users and groups (looked up once)."""
        if uid in self._free_of_host:
            return True
        if _known_to_host(uid):
            if uid not in self._warned:
                self._warned.add(uid)
                log.warning("job uid %d belongs to a host user or group: skipping it", uid)
            return False
        self._free_of_host.add(uid)
        return True

    def _check_soon(self, uid: int) -> None:
        """Look up the next uid while the event loop waits for this job's program anyway."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon(self._check, uid)

    def reserve(self, uid: int) -> None:
        """Mark ``uid`` in use by a job this worker adopted (no-op outside the range)."""
        if self._first <= uid < self._first + self._size:
            self._in_use.add(uid)

    def release(self, uid: int) -> None:
        self._in_use.discard(uid)
