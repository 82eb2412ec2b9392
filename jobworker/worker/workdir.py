"""Each job's working directory: ``DATA/work/<job id>``, owned by the job's account.

The directory is the job's default working directory and ``HOME``. On the host it sits in
a directory only root may enter; the job reaches it because its helper bind-mounts it, at
the same path, into the job's own view of the data directory (``init.c``). When a job that
ran under a uid of the worker's own ends, its directory is handed back to root, so that a
later job given the same uid cannot read what this one left.

Removing a job's directory may mean deleting millions of files its program made. The
directory is first renamed into ``DATA/removed/`` (at once, whatever it holds), and deleted
from there off the event loop (``Worker``); a server that stops before that is done deletes
what is left there when it next starts.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from jobworker.worker.accounts import Account

__all__ = ["WorkDirs"]


class WorkDirs:
    """The parent of every job's working directory."""

    def __init__(self, root: Path, removed: Path) -> None:
        self.root = root
        self.removed = removed

    def setup(self) -> None:
        for directory in (self.root, self.removed):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)

    def path(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, path: Path, account: Account) -> None:
        """A new, empty directory that only ``account`` may use."""
        path.mkdir(mode=0o700)
        os.chown(path, account.uid, account.gid, follow_symlinks=False)

    def give(self, path: Path, account: Account) -> None:
        """Hand a directory made ahead (root's, 0700, empty) to ``account``."""
        os.chown(path, account.uid, account.gid, follow_symlinks=False)

    def lock(self, path: Path) -> None:
        """Give the directory (not what it holds) back to root, mode 0700."""
        try:
            os.chown(path, 0, 0, follow_symlinks=False)
            os.chmod(path, 0o700, follow_symlinks=False)
        except FileNotFoundError:
            pass

    def remove(self, path: Path) -> None:
        """Delete a directory now, if it is there (one just made, or a start undone)."""
        with contextlib.suppress(OSError):
            self.delete(path)

    def discard(self, path: Path) -> Path | None:
        """Move a directory out of the job directories at once; return where it went, for
        :meth:`delete`, or None if there was none."""
        target = self.removed / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def discarded(self) -> list[Path]:
        """What :meth:`discard` moved away and no :meth:`delete` has finished with yet."""
        return [Path(entry.path) for entry in os.scandir(self.removed)]

    @staticmethod
    def delete(path: Path) -> None:
        """Delete a discarded directory and all it holds (blocking: run it in a thread).

        A job may have made its tree any depth: this walks it with one descriptor at a time
        and no recursion (``shutil.rmtree`` recurses, and a few thousand levels raise
        RecursionError), by names relative to the directory in hand (a deep path is longer
        than the kernel takes), never following a symbolic link. Nothing else writes in the
        tree meanwhile: its job has ended and it sits in a directory only root may enter, so
        ``..`` leads back the way the walk came. Raises OSError if something cannot go.
        """
        fd = os.open(path, _DIRECTORY)
        names: list[str] = []  # the walk's way down from ``path``
        try:
            while True:
                child = _clear_files(fd)
                if child is not None:
                    inner = os.open(child, _DIRECTORY, dir_fd=fd)
                    os.close(fd)
                    fd = inner
                    names.append(child)
                    continue
                if not names:
                    break
                parent = os.open("..", _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(names.pop(), dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(path)


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _clear_files(fd: int) -> str | None:
    """Unlink every entry of the directory open as ``fd`` that is not a directory, up to its
    first subdirectory; return that one's name, or None once the directory is empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=fd)
    return None
