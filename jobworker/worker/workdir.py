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

import os
import shutil
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
        """Delete a directory now (one just made, nearly empty)."""
        shutil.rmtree(path, ignore_errors=True)

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
        """Delete a discarded directory and all it holds (blocking: run it in a thread)."""
        shutil.rmtree(path, ignore_errors=True)
