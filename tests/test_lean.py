"""grpclib's per-stream state made lighter (server/lean.py): the replacements keep the
behaviour of asyncio's Event and Queue that grpclib relies on."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import anyio
import pytest

from jobworker.server.lean import LeanQueue
from jobworker.worker.flags import Flag

pytestmark = pytest.mark.anyio


async def test_a_flag_behaves_as_an_asyncio_event() -> None:
    flag, event = Flag(), asyncio.Event()
    results: dict[str, list[bool]] = {"flag": [], "event": []}

    async def waiter(name: str, target: Flag | asyncio.Event) -> None:
        results[name].append(await target.wait())

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            for name, target in (("flag", flag), ("event", event)):
                for _ in range(3):
                    tg.start_soon(waiter, name, target)
            await anyio.sleep(0.01)
            for target in (flag, event):
                assert not target.is_set()
                target.set()
                target.clear()  # set, then cleared before the waiters run: they still wake
    assert results["flag"] == results["event"] == [True] * 3
    assert not flag.is_set()


async def test_a_queue_hands_items_over_in_order_and_wakes_a_waiting_getter() -> None:
    queue: LeanQueue[int] = LeanQueue()
    assert queue.empty() and queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    got: list[int] = []

    async def getter() -> None:
        for _ in range(3):
            got.append(await queue.get())

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            await anyio.sleep(0.01)
            queue.put_nowait(1)
            queue.put_nowait(2)
            assert queue.qsize() == 2
            await anyio.sleep(0.01)
            queue.put_nowait(3)
    assert got == [1, 2, 3]
    assert queue._items is None and queue._put._waiters is None, "an idle queue holds nothing"


async def test_a_cancelled_getter_passes_its_wake_up_on() -> None:
    queue: LeanQueue[str] = LeanQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)  # both wait
    queue.put_nowait("item")  # wakes the first getter...
    first.cancel()  # ...which is cancelled before it runs, and takes nothing
    with anyio.fail_after(1):
        assert await second == "item", "the item went to the other getter"
    assert first.cancelled()
    assert queue.empty()


def test_serve_installs_them_into_grpclib() -> None:
    code = (
        "import asyncio, grpclib.protocol as p\n"
        "from jobworker.server.lean import install, LeanQueue\n"
        "assert p.Event is asyncio.Event\n"
        "print(install(), install(), p.Event.__name__, p.Queue is LeanQueue)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["True", "True", "Flag", "True"]
