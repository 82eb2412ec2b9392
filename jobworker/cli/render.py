"""How the CLI shows job statuses: aligned text for people, JSON for programs."""

from __future__ import annotations

import shlex
from datetime import datetime
from typing import Any

from jobworker.models import JobStatus, Limits, format_size

__all__ = ["status_json", "status_lines", "status_table"]


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


def _limits(limits: Limits, unenforced: frozenset[str]) -> str:
    parts = [
        f"{name}={value}{' (not enforced)' if name in unenforced else ''}"
        for name, value in limits.items().items()
    ]
    return ", ".join(parts) or "none"


def _account(status: JobStatus) -> str:
    return f"{status.user} (uid {status.uid})" if status.user else f"uid {status.uid} (its own)"


def _outcome(status: JobStatus) -> str:
    if status.signal is not None:
        return f"signal {status.signal}"
    if status.exit_code is not None:
        return f"exit {status.exit_code}"
    return "-"


def _output(status: JobStatus) -> str:
    text = f"{status.output_bytes} bytes written"
    if status.max_output is not None:
        text += f", {status.output_dropped} dropped (cap {format_size(status.max_output)})"
    if status.output_lost:
        text += "; some output was lost: the server's disk was full"
    return text


def status_lines(status: JobStatus) -> list[str]:
    """A job's status as ``key: value`` lines."""
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
        ("started", _time(status.started_at) or "-"),
        ("ended", _time(status.ended_at) or "-"),
        ("limits", _limits(status.limits, status.unenforced)),
        ("output", _output(status)),
    ]
    if status.usage.cpu_usec is not None:
        rows.append(("cpu time", f"{status.usage.cpu_usec / 1e6:.3f} s"))
    if status.usage.memory_peak_bytes is not None:
        rows.append(("peak memory", f"{status.usage.memory_peak_bytes} bytes"))
    if status.stopped_by:
        rows.append(("stopped by", status.stopped_by))
    counters = (
        ("oom kills", status.usage.oom_kills, ""),
        ("cpu throttled", status.usage.cpu_throttled_usec, " us"),
        ("pids limit hits", status.usage.pids_limit_hits, ""),
        ("io read", status.usage.io_read_bytes, " bytes"),
        ("io written", status.usage.io_write_bytes, " bytes"),
    )
    rows.extend((name, f"{value}{unit}") for name, value, unit in counters if value is not None)
    width = max(len(k) for k, _ in rows)
    return [f"{key + ':':<{width + 1}} {value}" for key, value in rows]


def status_table(jobs: list[JobStatus]) -> list[str]:
    """One line per job under a header."""
    header = ("ID", "STATE", "RESULT", "OWNER", "STARTED", "COMMAND")
    rows = [
        (
            j.id,
            j.state.value,
            _outcome(j),
            j.owner,
            j.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            _command(j),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in [header, *rows]
    ]
