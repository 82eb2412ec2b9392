"""A flag that tasks wait on, small enough to keep one per job and one per reader.

``asyncio.Event`` (and ``anyio.Event``, which wraps one) costs about 0.9 KB: its waiter deque
allocates a block of 64 slots at once. The worker keeps flags per running job and per output
reader, so 10,000 jobs with 10,000 followers would spend tens of megabytes on empty deques.
A :class:`Flag` holds futures only while someone waits.
"""

from __future__ import annotations

import asyncio

__all__ = ["Flag"]


class Flag:
    """``asyncio.Event``'s interface (``set``, ``clear``, ``is_set``, ``wait``), for any
    number of waiters, holding a list of futures only while someone waits.

    Level-triggered: ``wait()`` returns at once while the flag is set, and a waiter woken by
    ``set()`` returns even if ``clear()`` re-armed the flag before it ran."""

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
