"""How the CLI shows job statuses: aligned text for people, JSON for programs.

Text is for a person at this host: times in the local zone with the job's age and run time,
signals by name, limits in the units the options take (``memory=256M cpus=0.5``). JSON is for
programs: times in ISO 8601 UTC, numbers in their base units, as the API has them.
"""

from __future__ import annotations

import itertools
import shlex
import signal
from datetime import UTC, datetime
from typing import Any

from jobworker.models import LIMIT_OPTIONS, JobStatus, Limits, format_cpus, format_size

__all__ = ["LineStamper", "stamp", "status_json", "status_lines", "status_table"]


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def status_json(status: JobStatus) -> dict[str, Any]:
    """A job's status as a JSON object (times in ISO 8601, UTC)."""
    return {
        "id": status.id,
        "state": status.state.value,
        "pid": status.pid,
        "exit_code": status.exit_code,
        "signal": status.signal,
        "oom_killed": status.oom_killed,
        "owner": status.owner,
        "command": status.program,
        "args": list(status.args),
        "started_at": _time(status.started_at),
        "ended_at": _time(status.ended_at),
        "user": status.user or None,
        "uid": status.uid,
        "network": status.network.value,
        "cwd": status.cwd,
        "env": dict(status.env),
        "limits": status.limits.items(),
        "unenforced_limits": sorted(status.unenforced),
        "stopped_by": status.stopped_by or None,
        "max_output": status.max_output,
        "output_bytes": status.output_bytes,
        "output_dropped": status.output_dropped,
        "output_lost": status.output_lost,
        "usage": {
            "cpu_usec": status.usage.cpu_usec,
            "memory_peak_bytes": status.usage.memory_peak_bytes,
            "oom_kills": status.usage.oom_kills,
            "cpu_throttled_usec": status.usage.cpu_throttled_usec,
            "pids_limit_hits": status.usage.pids_limit_hits,
            "io_read_bytes": status.usage.io_read_bytes,
            "io_write_bytes": status.usage.io_write_bytes,
        },
    }


def _command(status: JobStatus) -> str:
    return shlex.join([status.program, *status.args])


# How each limit's value is written on the command line (start's options).
_LIMIT_FORMS: dict[str, tuple[str, Any]] = {
    name: (LIMIT_OPTIONS[name].removeprefix("--"), form)
    for name, form in [
        ("memory_bytes", format_size),
        ("cpu_millis", format_cpus),
        ("pids", str),
        ("io_read_bps", format_size),
        ("io_write_bps", format_size),
    ]
}


def limits_text(limits: Limits, unenforced: frozenset[str] = frozenset()) -> str:
    """Limits as start's options name and write them: ``memory=256M cpus=0.5``."""
    parts = []
    for name, value in limits.items().items():
        option, form = _LIMIT_FORMS.get(name, (name, str))
        parts.append(f"{option}={form(value)}{' (not enforced)' if name in unenforced else ''}")
    return " ".join(parts) or "none"


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; the number itself for one this host does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def duration_text(seconds: float) -> str:
    """A duration for a person: ``850 ms``, ``12.3 s``, ``4m05s``, ``2h07m``, ``3d04h``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def local_time(value: datetime) -> str:
    """An aware time in this host's zone, to the second."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def stamp(value: datetime | None) -> bytes:
    """A line's time as ``logs --timestamps`` prints it: ISO 8601 in this host's zone, to
    the millisecond, or a dash of the same width where the server has no time."""
    if value is None:
        return _NO_STAMP
    return value.astimezone().isoformat(timespec="milliseconds").encode() + b" "


_NO_STAMP = b"-".ljust(len(stamp(datetime(2000, 1, 1, tzinfo=UTC))))


class LineStamper:
    """Puts the time a line's first byte was written in front of every line of a stream of
    chunks, a line being what ends in a newline (or the output's last bytes)."""

    def __init__(self) -> None:
        self._line_start = True

    def __call__(self, data: bytes, written_at: datetime | None) -> bytes:
        """``data`` with a stamp in front of each line that begins in it."""
        prefix = stamp(written_at)
        out = bytearray()
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._line_start and (piece or not last):
                out += prefix
                self._line_start = False
            out += piece
            if not last:
                out += b"\n"
                self._line_start = True
        return bytes(out)


def _started(status: JobStatus, now: datetime) -> str:
    age = duration_text((now - status.started_at).total_seconds())
    return f"{local_time(status.started_at)} ({age} ago)"


def _ended(status: JobStatus) -> str:
    if status.ended_at is None:
        return "-"
    ran = duration_text((status.ended_at - status.started_at).total_seconds())
    return f"{local_time(status.ended_at)} (ran {ran})"


def _account(status: JobStatus) -> str:
    return f"{status.user} (uid {status.uid})" if status.user else f"uid {status.uid} (its own)"


def _outcome(status: JobStatus) -> str:
    if status.signal is not None:
        return signal_name(status.signal)
    if status.exit_code is not None:
        return f"exit {status.exit_code}"
    return "-"


def _bytes(size: int) -> str:
    """Bytes for a person, in binary units: ``512 bytes``, ``12.5 MiB``."""
    if size < 1024:
        return f"{size} bytes"
    units = ("KiB", "MiB", "GiB", "TiB")
    value, index = size / 1024, 0
    while value >= 1024 and index < len(units) - 1:
        value, index = value / 1024, index + 1
    return f"{value:.1f} {units[index]}"


def _output(status: JobStatus) -> str:
    text = f"{status.output_bytes} bytes written"
    if status.max_output is not None:
        text += f", {status.output_dropped} dropped (cap {format_size(status.max_output)})"
    if status.output_lost:
        text += "; some output was lost: the server's disk was full"
    return text


def status_lines(status: JobStatus, now: datetime | None = None) -> list[str]:
    """A job's status as ``key: value`` lines (``now``: for the job's age; tests give it)."""
    now = now or datetime.now(UTC)
    rows = [
        ("id", status.id),
        ("state", status.state.value),
        ("command", _command(status)),
        ("owner", status.owner),
        ("runs as", _account(status)),
        ("network", status.network.value),
        ("cwd", status.cwd),
        ("env", shlex.join(f"{k}={v}" for k, v in status.env.items()) or "-"),
        ("pid", str(status.pid)),
        ("result", _outcome(status)),
        ("oom killed", "yes" if status.oom_killed else "no"),
        ("started", _started(status, now)),
        ("ended", _ended(status)),
        ("limits", limits_text(status.limits, status.unenforced)),
        ("output", _output(status)),
    ]
    if status.usage.cpu_usec is not None:
        rows.append(("cpu time", duration_text(status.usage.cpu_usec / 1e6)))
    if status.usage.memory_peak_bytes is not None:
        rows.append(("peak memory", _bytes(status.usage.memory_peak_bytes)))
    if status.stopped_by:
        rows.append(("stopped by", status.stopped_by))
    counters = (
        ("oom kills", status.usage.oom_kills, ""),
        ("cpu throttled (us)", status.usage.cpu_throttled_usec, ""),
        ("pids limit hits", status.usage.pids_limit_hits, ""),
        ("io read", status.usage.io_read_bytes, " bytes"),
        ("io written", status.usage.io_write_bytes, " bytes"),
    )
    rows.extend((name, f"{value}{unit}") for name, value, unit in counters if value is not None)
    width = max(len(k) for k, _ in rows)
    return [f"{key + ':':<{width + 1}} {value}" for key, value in rows]


# The table's short ids and commands (``list --no-trunc`` shows them whole).
SHORT_ID = 8
COMMAND_WIDTH = 48


def unique_prefix_length(ids: list[str], least: int = SHORT_ID) -> int:
    """The shortest length, at least ``least``, at which no two of ``ids`` share a prefix."""
    length = least
    ordered = sorted(ids)
    for first, second in itertools.pairwise(ordered):
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        length = max(length, common + 1)
    return length


def short_command(status: JobStatus, width: int = COMMAND_WIDTH) -> str:
    """The job's command line, cut to ``width`` characters with an ellipsis."""
    command = _command(status)
    return command if len(command) <= width else command[: width - 1] + "…"


def _run_time(status: JobStatus, now: datetime) -> str:
    end = status.ended_at or now
    return duration_text(max((end - status.started_at).total_seconds(), 0.0))


def status_table(
    jobs: list[JobStatus],
    now: datetime | None = None,
    truncate: bool = True,
    id_length: int | None = None,
) -> list[str]:
    """One line per job under a header: a short id, state, result, owner, age, run time so
    far, and command. The short ids are ``id_length`` long, by default as long as it takes to
    tell these jobs apart (the CLI takes any unique prefix of an id)."""
    now = now or datetime.now(UTC)
    id_length = id_length or unique_prefix_length([j.id for j in jobs])
    header = ("ID", "STATE", "RESULT", "OWNER", "AGE", "DURATION", "COMMAND")
    rows = [
        (
            j.id[:id_length] if truncate else j.id,
            j.state.value,
            _outcome(j),
            j.owner,
            duration_text(max((now - j.started_at).total_seconds(), 0.0)),
            _run_time(j, now),
            short_command(j) if truncate else _command(j),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in [header, *rows]
    ]
