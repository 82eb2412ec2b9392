"""Process-wide settings for a long-running server: descriptors, the C allocator and TLS
read buffers.

All are applied by :func:`jobworker.server.app.serve`, which owns its process; a program
that embeds :class:`~jobworker.server.app.JobworkerServer` decides for itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
from asyncio import sslproto
from typing import Final

__all__ = ["raise_open_file_limit", "shrink_tls_read_buffers", "tune_malloc"]

log = logging.getLogger(__name__)

# glibc's <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

MMAP_THRESHOLD: Final = 4 * 1024 * 1024
TRIM_THRESHOLD: Final = 32 * 1024 * 1024
TLS_READ_BUFFER: Final = 32 * 1024


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the soft limit.

    Every running job holds a descriptor (its monitor's pidfd), and every output stream one
    for its log file while it reads: at the usual soft limit of 1024, some 1,000 jobs end in
    EMFILE. The hard limit is the ceiling the administrator set.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.info("raised the open-file limit from %d to %d", soft, target)
        return target
    return soft


def tune_malloc() -> bool:
    """Serve output buffers from the heap, not from a fresh mmap each; True if applied.

    Streaming output allocates and frees buffers of a chunk's size and more (the read, the
    message, the frame, the TLS record) for every chunk. glibc's allocator maps blocks above
    its dynamic threshold (128 KiB at first) afresh and returns a heap top above twice that
    to the kernel, so after a while every 256 KiB chunk cost page faults and zeroing: the
    server's CPU per MiB streamed doubled. Fixed thresholds (mmap above 4 MiB, trim above
    32 MiB) keep those buffers in the heap. Skipped where the administrator tunes malloc
    (``GLIBC_TUNABLES``, ``MALLOC_*_``) and where the C library is not glibc.
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


def shrink_tls_read_buffers() -> bool:
    """Read each TLS connection through a 32 KiB buffer, not asyncio's 256 KiB; True if
    applied.

    asyncio allocates and zeroes the buffer a TLS connection's incoming bytes are read into
    as the connection is made: 256 KiB of resident memory per connection, 28 MB for the 112
    connections that carry 10,000 followers, 2.5 GB for 10,000 idle connections. A server
    receives small requests, and 32 KiB holds two full TLS records. It applies to every
    asyncio TLS connection of the process (``asyncio.sslproto.SSLProtocol.max_size``, which
    is not public API: skipped where it is missing).
    """
    protocol = getattr(sslproto, "SSLProtocol", None)
    if not isinstance(getattr(protocol, "max_size", None), int):
        return False
    protocol.max_size = TLS_READ_BUFFER  # type: ignore[union-attr]
    return True
