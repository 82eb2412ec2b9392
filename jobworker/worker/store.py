"""Durable job records: one SQLite database (``DATA/jobs.db``) in write-ahead-log mode.

A record is a job's :class:`~jobworker.models.JobStatus`, stored as one JSON document beside
the columns that are looked up (id, owner, state) and its start order. The worker writes a
record when a job has started, before ``start`` returns; again when a stop is asked for (so
that a server that dies while stopping still reports STOPPED); and once more when the job
has ended. A later server on the same data directory loads every record: the jobs still
running are adopted, the ended ones are served as they are (docs/design.md, "Durable
records").

What reaches the disk when (``synchronous = NORMAL`` in WAL mode): every commit is written
to the WAL file with ``write()`` before the call returns, so it survives the server being
killed at any point (SIGKILL included) and a clean reboot. The WAL is fsync'd at each
checkpoint (every 1,000 pages by default) and when the database is closed; a power cut can
lose the commits since the last checkpoint, never corrupt the database.

A full disk: SQLite then fails a commit (``SQLITE_FULL``) and rolls it back; the database
stays intact. So that the end of a job can still be recorded when a job has filled the disk,
the store keeps a small reserve file beside the database (``jobs.db-reserve``), created when
the store opens and there is room. A change to a record that fails for want of space removes
the reserve and is tried once more.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from jobworker.errors import ConfigError
from jobworker.models import JobState, JobStatus, Limits, Network, Usage

__all__ = ["JobStore", "status_from_json", "status_to_json"]

_SCHEMA_VERSION: Final = 1
_RESERVE_BYTES: Final = 256 * 1024
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    id     TEXT NOT NULL UNIQUE,
    owner  TEXT NOT NULL,
    state  TEXT NOT NULL,
    status TEXT NOT NULL
)
"""


class JobStore:
    """The records of every job a worker on this data directory has started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserve = path.with_name(path.name + "-reserve")
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the job records {self.path}: {exc}") from exc
        try:
            os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise ConfigError(
                    f"the job records {self.path} are of a newer jobworker (schema {version}); "
                    "use that version, or another data directory"
                )
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            db.close()
            raise ConfigError(f"cannot use the job records {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db = db
        self._make_reserve()

    def _make_reserve(self) -> None:
        """Set aside the space that recording the end of jobs may need on a full disk."""
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, _RESERVE_BYTES)
        except OSError:
            self.reserve.unlink(missing_ok=True)  # no room now; the next start tries again
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def opened(self) -> Iterator[JobStore]:
        self.open()
        try:
            yield self
        finally:
            self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the job store is not open")
        return self._db

    def add(self, status: JobStatus) -> None:
        """Record a job that has just started (committed when this returns)."""
        self._conn.execute(
            "INSERT INTO jobs (id, owner, state, status) VALUES (?, ?, ?, ?)",
            (status.id, status.owner, status.state.value, status_to_json(status)),
        )

    def update(self, status: JobStatus) -> None:
        """Replace a job's record (committed when this returns), using the reserve if the
        disk is full."""
        change = (
            "UPDATE jobs SET state = ?, status = ? WHERE id = ?",
            (status.state.value, status_to_json(status), status.id),
        )
        try:
            self._conn.execute(*change)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or not self.reserve.exists():
                raise
            self.reserve.unlink()
            self._conn.execute(*change)

    def remove(self, job_id: str) -> None:
        """Delete a job's record (committed when this returns)."""
        self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def load(self) -> list[JobStatus]:
        """Every record, oldest first."""
        rows = self._conn.execute("SELECT status FROM jobs ORDER BY seq").fetchall()
        return [status_from_json(row[0]) for row in rows]


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def status_to_json(status: JobStatus) -> str:
    document: dict[str, Any] = {
        "id": status.id,
        "state": status.state.value,
        "owner": status.owner,
        "program": status.program,
        "args": list(status.args),
        "pid": status.pid,
        "started_at": _time(status.started_at),
        "ended_at": _time(status.ended_at),
        "exit_code": status.exit_code,
        "signal": status.signal,
        "oom_killed": status.oom_killed,
        "limits": status.limits.items(),
        "unenforced": sorted(status.unenforced),
        "usage": {k: v for k, v in vars(status.usage).items() if v is not None},
        "env": dict(status.env),
        "cwd": status.cwd,
        "user": status.user,
        "uid": status.uid,
        "network": status.network.value,
        "stopped_by": status.stopped_by,
        "max_output": status.max_output,
        "output_bytes": status.output_bytes,
        "output_dropped": status.output_dropped,
        "output_lost": status.output_lost,
        "owner_role": status.owner_role,
    }
    return json.dumps(document, separators=(",", ":"))


def status_from_json(text: str) -> JobStatus:
    d = json.loads(text)
    ended = d.get("ended_at")
    return JobStatus(
        id=d["id"],
        state=JobState(d["state"]),
        owner=d["owner"],
        program=d["program"],
        args=tuple(d["args"]),
        pid=d["pid"],
        started_at=datetime.fromisoformat(d["started_at"]),
        ended_at=None if ended is None else datetime.fromisoformat(ended),
        exit_code=d.get("exit_code"),
        signal=d.get("signal"),
        oom_killed=d.get("oom_killed", False),
        limits=Limits(**d.get("limits", {})),
        unenforced=frozenset(d.get("unenforced", ())),
        usage=Usage(**d.get("usage", {})),
        env=d.get("env", {}),
        cwd=d.get("cwd", ""),
        user=d.get("user", ""),
        uid=d.get("uid", 0),
        network=Network(d.get("network", "host")),
        stopped_by=d.get("stopped_by", ""),
        max_output=d.get("max_output"),
        output_bytes=d.get("output_bytes", 0),
        output_dropped=d.get("output_dropped", 0),
        output_lost=d.get("output_lost", False),
        owner_role=d.get("owner_role", ""),
    )
