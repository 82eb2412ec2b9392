"""The worker's flag (worker/flags.py), in a real event loop; tests/test_lean.py compares it
with asyncio.Event."""

from __future__ import annotations

import anyio
import pytest

from jobworker.worker.flags import Flag

pytestmark = pytest.mark.anyio


async def test_a_set_flag_returns_at_once_until_cleared() -> None:
    flag = Flag()
    flag.set()
    with anyio.fail_after(1):
        assert await flag.wait()
        assert await flag.wait()  # level-triggered: still set
    flag.clear()
    with anyio.move_on_after(0.05) as scope:
        await flag.wait()
    assert scope.cancelled_caught, "a cleared flag did not block"


async def test_a_flag_wakes_every_waiter_and_stays_set() -> None:
    flag = Flag()
    woken = []

    async def waiter(n: int) -> None:
        await flag.wait()
        woken.append(n)

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(waiter, n)
            await anyio.sleep(0.01)
            assert not woken
            flag.set()
        await flag.wait()
    assert sorted(woken) == list(range(5))
    assert flag.is_set()


async def test_a_cancelled_flag_waiter_is_forgotten() -> None:
    flag = Flag()
    with anyio.move_on_after(0.01):
        await flag.wait()
    assert flag._waiters == [], "a cancelled waiter's future was kept"
    flag.set()
    assert flag._waiters is None
