"""Process-wide settings for a long-running server: descriptors and TLS read buffers (the
C allocator's are in :mod:`jobworker.malloc`, shared with the CLI).

All are applied by :func:`jobworker.server.app.serve`, which owns its process; a program
that embeds :class:`~jobworker.server.app.JobworkerServer` decides for itself.
"""

from __future__ import annotations

import logging
import resource
from asyncio import sslproto
from typing import Final

__all__ = ["raise_open_file_limit", "shrink_tls_read_buffers"]

log = logging.getLogger(__name__)

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
