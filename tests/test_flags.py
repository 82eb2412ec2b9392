"""The worker's small flags (worker/flags.py), in a real event loop."""

from __future__ import annotations

import anyio
import pytest

from jobworker.worker.flags import Flag, Wakeup

pytestmark = pytest.mark.anyio


async def test_a_wakeup_set_before_the_wait_returns_at_once_until_cleared() -> None:
    wakeup = Wakeup()
    wakeup.set()
    with anyio.fail_after(1):
        await wakeup.wait()
        await wakeup.wait()  # level-triggered: still set
    wakeup.clear()
    with anyio.move_on_after(0.05) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught, "a cleared wakeup did not block"


async def test_a_wakeup_wakes_its_waiter_even_if_cleared_before_it_runs() -> None:
    wakeup = Wakeup()
    woken = []

    async def waiter() -> None:
        await wakeup.wait()
        woken.append(True)

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            wakeup.set()
            wakeup.clear()  # the reader re-arms before the woken task runs
    assert woken == [True]


async def test_a_wakeup_refuses_a_second_waiter_and_recovers_from_a_cancelled_one() -> None:
    wakeup = Wakeup()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wakeup.wait)
        await anyio.sleep(0.01)
        with pytest.raises(RuntimeError, match="one waiter"):
            await wakeup.wait()
        tg.cancel_scope.cancel()
    wakeup.set()
    with anyio.fail_after(1):
        await wakeup.wait()  # the cancelled waiter left nothing behind


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
