"""Lighter per-stream state for grpclib, in a server's own process.

grpclib gives every HTTP/2 stream three ``asyncio.Event`` objects and an ``asyncio.Queue``
(``grpclib/protocol.py``). Each of them holds empty deques, and a deque allocates a block of
64 slots as soon as it exists: about 5 KB of the 19 KB an open stream costs the server, 50 MB
for 10,000 followers. :func:`install` has ``grpclib.protocol`` build a
:class:`~jobworker.worker.flags.Flag` and a :class:`LeanQueue` instead, which offer what
grpclib calls and allocate only while they are used.

Applied by :func:`jobworker.server.app.serve`, which owns its process (like
``server/tuning.py``); a program that embeds the server decides for itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import grpclib.protocol

from jobworker.worker.flags import Flag

__all__ = ["LeanQueue", "install"]

T = TypeVar("T")


class LeanQueue(Generic[T]):
    """An unbounded FIFO queue with ``asyncio.Queue``'s ``put_nowait``, ``get``,
    ``get_nowait``, ``empty`` and ``qsize``. It holds a deque only while it holds items; its
    getters wait on a :class:`Flag` that each put sets, and look again when woken."""

    __slots__ = ("_items", "_put")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._put = Flag()

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._put.set()

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            self._put.clear()
            await self._put.wait()
        return self.get_nowait()


def install() -> bool:
    """Make grpclib's streams use :class:`Flag` and :class:`LeanQueue`; True if applied.

    Skipped (False) where ``grpclib.protocol`` no longer builds ``asyncio.Event`` and
    ``asyncio.Queue`` under those names.
    """
    names = vars(grpclib.protocol)
    if names.get("Event") is Flag and names.get("Queue") is LeanQueue:
        return True
    if names.get("Event") is not asyncio.Event or names.get("Queue") is not asyncio.Queue:
        return False
    names["Event"] = Flag
    names["Queue"] = LeanQueue
    return True
