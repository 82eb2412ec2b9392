"""The C allocator's thresholds, for a process that streams output (the server, the CLI).

Applied by the processes jobworker owns: ``jobworker serve``, and the CLI commands that
stream a job's output (``logs``, ``stream``, ``run``). A program that embeds the server or
the client library decides for itself; the same settings are glibc's environment variables
``MALLOC_MMAP_THRESHOLD_=4194304`` and ``MALLOC_TRIM_THRESHOLD_=33554432``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

# glibc's <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

MMAP_THRESHOLD: Final = 4 * 1024 * 1024
TRIM_THRESHOLD: Final = 32 * 1024 * 1024


def tune_malloc() -> bool:
    """Serve output buffers from the heap, not from a fresh mmap each; True if applied.

    Streaming output allocates and frees buffers of a chunk's size and more (the read, the
    message, the frame, the TLS record) for every chunk, on both ends. glibc's allocator
    maps blocks above its dynamic threshold (128 KiB at first) afresh and returns a heap top
    above twice that to the kernel, so every 256 KiB chunk can cost page faults and zeroing:
    that doubled the server's CPU per MiB streamed, and halved what ``jobworker logs`` reads
    per second. Fixed thresholds (mmap above 4 MiB, trim above 32 MiB) keep those buffers
    in the heap. Skipped where the administrator tunes malloc (``GLIBC_TUNABLES``,
    ``MALLOC_*_``) and where the C library is not glibc.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(n.startswith("MALLOC_") for n in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc returns 1 on success; musl has a mallopt that does nothing and returns 0.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
