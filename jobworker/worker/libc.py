"""The C library, for the system calls that :mod:`os` does not offer (``fallocate``,
``inotify``, ``prctl``)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["checked", "libc"]

# The C library the interpreter already links, found among the process's own symbols:
# ctypes.util.find_library would run ldconfig in a child process to name it.
libc = ctypes.CDLL(None, use_errno=True)


def checked(result: int, filename: str | bytes | os.PathLike[str] | None = None) -> int:
    """``result`` of a libc call, or the :class:`OSError` (of the right subclass) for the
    ``errno`` it set when it returned -1."""
    if result == -1:
        code = ctypes.get_errno()
        if filename is None:
            raise OSError(code, os.strerror(code))
        raise OSError(code, os.strerror(code), filename)
    return result
