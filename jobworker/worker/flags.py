"""Flags that tasks wait on, small enough to keep one per job and one per reader.

``asyncio.Event`` (and ``anyio.Event``, which wraps one) costs about 0.9 KB: its waiter deque
allocates a block of 64 slots at once. The worker keeps flags per running job and per output
reader, so 10,000 jobs with 10,000 followers would spend tens of megabytes on empty deques.
These hold a future only while someone waits.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Flag", "Waker", "Wakeup"]


class Waker(Protocol):
    """What a job's end sets (a :class:`Wakeup`, or an object that does more)."""

    def set(self) -> None: ...


class Wakeup:
    """A level-triggered flag with one waiter at a time: file changes and job ends set it.

    ``wait()`` returns at once while the flag is set; ``clear()`` re-arms it.
    """

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    def is_set(self) -> bool:
        return self._is_set

    async def wait(self) -> None:
        if self._is_set:
            return
        if self._waiter is not None:
            raise RuntimeError("a Wakeup has one waiter at a time")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class Flag:
    """``asyncio.Event``'s interface (``set``, ``clear``, ``is_set``, ``wait``), for any
    number of waiters, holding a list of futures only while someone waits."""

    __slots__ = ("_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        if self._is_set:
            return
        self._is_set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> bool:
        if self._is_set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            # Woken, the list was swapped out by set(); cancelled, it is still here.
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True
