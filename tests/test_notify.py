"""The worker's one inotify instance: who it wakes, and that it shares the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from jobworker.worker.flags import Flag
from jobworker.worker.notify import BATCH, FileWatcher

pytestmark = pytest.mark.anyio


async def test_a_waiter_may_leave_while_it_is_woken(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    woken: list[str] = []

    class Leaver:
        def set(self) -> None:
            woken.append("leaver")
            watcher.discard(watched, self)

    class Stayer:
        def set(self) -> None:
            woken.append("stayer")

    with anyio.fail_after(10):
        async with FileWatcher() as watcher:
            leaver, stayer = Leaver(), Stayer()
            watched = watcher.add(path, leaver)
            watcher.add(path, stayer)
            with path.open("ab") as f:
                f.write(b"x")
            while len(woken) < 2:
                await anyio.sleep(0.01)
            with path.open("ab") as f:
                f.write(b"y")
            while woken.count("stayer") < 2:
                await anyio.sleep(0.01)
    assert woken.count("leaver") == 1, "woken once, then gone"


async def test_files_that_change_all_the_time_leave_the_loop_its_turns(tmp_path: Path) -> None:
    # Two files written in turn: inotify merges only repeats of the same event, so each write
    # is an event of its own, all of them queued before the loop next looks.
    paths = [tmp_path / "a", tmp_path / "b"]
    writes = 4 * BATCH
    woken = 0
    woken_before_others_ran: list[int] = []

    class Counter:
        def set(self) -> None:
            nonlocal woken
            if woken == 0:  # runs once the callback that dispatches this event is done
                asyncio.get_running_loop().call_soon(lambda: woken_before_others_ran.append(woken))
            woken += 1

    with anyio.fail_after(10):
        async with FileWatcher() as watcher:
            counter = Counter()
            for path in paths:
                path.write_bytes(b"")
                watcher.add(path, counter)
            with paths[0].open("ab") as a, paths[1].open("ab") as b:
                for _ in range(writes // 2):
                    a.write(b"x")
                    a.flush()
                    b.write(b"y")
                    b.flush()
            while woken < writes:
                await anyio.sleep(0.01)
    assert woken >= writes, "every event woke its waiter"
    assert woken_before_others_ran == [BATCH], "one batch a turn, then the others' turn"


async def test_a_waiter_may_leave_as_the_watcher_closes(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    left: list[str] = []

    class Leaver:
        def set(self) -> None:  # woken once more as the watcher closes
            left.append("woken")
            watcher.discard(watched, self)

    async with FileWatcher() as watcher:
        leaver = Leaver()
        watched = watcher.add(path, leaver)
    assert left == ["woken"] and watcher.watch_count == 0


async def test_events_lost_to_a_full_queue_wake_every_waiter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # More events than the kernel queues for one instance, all before the loop reads any:
    # the kernel drops the rest and queues IN_Q_OVERFLOW instead, which names no watch. A
    # waiter whose file changed only after the queue was full would otherwise sleep on.
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    busy = [tmp_path / "a", tmp_path / "b"]
    quiet = tmp_path / "quiet"
    woken = Flag()
    with anyio.fail_after(30):
        async with FileWatcher() as watcher:
            for path in busy:
                path.write_bytes(b"")
                watcher.add(path, Flag())
            quiet.write_bytes(b"")
            watcher.add(quiet, woken)
            with busy[0].open("ab") as a, busy[1].open("ab") as b:
                for _ in range(limit // 2 + 1):
                    a.write(b"x")
                    a.flush()
                    b.write(b"y")
                    b.flush()
            with quiet.open("ab") as f:
                f.write(b"z")  # its event is lost: the queue is full
            await woken.wait()
            assert watcher.watch_count == 3, "the overflow dropped no watch"
    warnings = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(warnings) == 1, "the overflow is logged"
    assert "fs.inotify.max_queued_events" in warnings[0]


async def test_a_file_that_cannot_be_watched_raises_and_adds_nothing(tmp_path: Path) -> None:
    async with FileWatcher() as watcher:
        with pytest.raises(FileNotFoundError) as raised:
            watcher.add(tmp_path / "missing", Flag())
        assert raised.value.filename == tmp_path / "missing"
        with pytest.raises(ValueError, match="null byte"):
            watcher.add(tmp_path / "a\0b", Flag())  # C would watch "a" instead
        assert watcher.watch_count == 0


async def test_a_removed_file_wakes_its_waiters_and_its_watch_goes(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    woken = Flag()
    with anyio.fail_after(10):
        async with FileWatcher() as watcher:
            watched = watcher.add(path, woken)
            path.unlink()
            await woken.wait()
            while watcher.watch_count:  # IN_IGNORED follows IN_DELETE_SELF
                await anyio.sleep(0.01)
            watcher.discard(watched, woken)  # the watch is gone already: nothing to remove
            assert watcher.watch_count == 0
