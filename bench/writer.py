"""A job that writes ``TOTAL`` bytes of a fixed pattern to stdout as fast as it can.

Run as a script by the server (``python -I writer.py TOTAL``); the bench imports
:func:`pattern` to check every byte it receives. The pattern is pseudo-random and its period
is no multiple of any chunk size, so a byte at a wrong offset does not go unnoticed.
"""

from __future__ import annotations

import hashlib
import os
import sys

PERIOD = 4 * 1024 * 1024 + 96
BLOCK = 1024 * 1024


def pattern(size: int = PERIOD) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:size])


def main(total: int) -> None:
    doubled = memoryview(pattern() * 2)
    written = 0
    while written < total:
        start = written % PERIOD
        written += os.write(1, doubled[start : start + min(BLOCK, total - written)])


if __name__ == "__main__":
    main(int(sys.argv[1]))
