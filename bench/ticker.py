"""A job that writes ``COUNT`` lines ``<n> <time.time_ns()>``, one every ``PERIOD`` seconds."""

from __future__ import annotations

import os
import sys
import time


def main(count: int, period: float) -> None:
    due = time.monotonic()
    for n in range(count):
        os.write(1, b"%d %d\n" % (n, time.time_ns()))
        due += period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
