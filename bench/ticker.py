"""A job that writes ``COUNT`` lines ``<n> <time.time_ns()>``, one every ``PERIOD`` seconds.

It waits ``DELAY`` seconds before the first line, so that a follower that attaches after the
start is already waiting: the delays measured are those of live output, not of catching up.
"""

from __future__ import annotations

import os
import sys
import time


def main(count: int, period: float, delay: float) -> None:
    time.sleep(delay)
    due = time.monotonic()
    for n in range(count):
        os.write(1, b"%d %d\n" % (n, time.time_ns()))
        due += period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
