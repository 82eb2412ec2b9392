"""The public models: specs, limits, states, statuses, and the parsers of sizes and CPUs.

Everything here is a frozen dataclass, an enum or a pure function, with no I/O. The worker,
the server's mapping code, the client library and the CLI all share it, so importing it
loads nothing of the server, the worker or the PKI::

    from jobworker.models import JobState, Limits, parse_size

    limits = Limits(memory_bytes=parse_size("256M"), cpu_millis=parse_cpus("0.5"))
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Final

from jobworker.errors import InvalidCommand, InvalidJobId, InvalidLimits

__all__ = [
    "LIMIT_CONTROLLERS",
    "LIMIT_RANGES",
    "MAX_COMMAND_BYTES",
    "MAX_OUTPUT_RANGE",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Limits",
    "Network",
    "OutputChunk",
    "Usage",
    "format_cpus",
    "format_size",
    "new_job_id",
    "parse_cpus",
    "parse_duration",
    "parse_job_id",
    "parse_size",
]

_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_job_id() -> str:
    """A fresh job id: a random (version 4) UUID in its canonical lowercase form."""
    return str(uuid.uuid4())


def parse_job_id(text: str) -> str:
    """Return ``text`` as a canonical job id, or raise :class:`InvalidJobId`.

    Only the canonical 36-character form of a version 4 UUID is accepted (either case), so
    an id can never carry path separators, dots or anything else into a file name.
    """
    if not isinstance(text, str) or _JOB_ID.fullmatch(text.lower()) is None:
        shown = text[:64] if isinstance(text, str) else type(text).__name__
        raise InvalidJobId(
            f"invalid job id {shown!r}: expected a UUID like 3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"
        )
    return text.lower()


class JobState(enum.Enum):
    """Where a job is in its life. Every state but RUNNING is final."""

    RUNNING = "running"
    COMPLETED = "completed"  # the main process exited by itself, with any exit code
    STOPPED = "stopped"  # ended by a stop request
    TERMINATED = "terminated"  # killed by a signal that was not our stop (e.g. the OOM killer)
    LOST = "lost"  # ended while no server watched it, and its exit status was not recorded

    @property
    def is_final(self) -> bool:
        return self is not JobState.RUNNING


# Accepted range of each limit, inclusive. CPU is in thousandths of a CPU: the kernel's
# smallest quota is 1 ms per 100 ms period, which is 10 thousandths.
LIMIT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "memory_bytes": (1 << 20, (1 << 63) - 1),
    "cpu_millis": (10, 1_000_000),
    "pids": (1, 4_194_304),
    "io_read_bps": (1, (1 << 63) - 1),
    "io_write_bps": (1, (1 << 63) - 1),
}

# The cgroup v2 controller each limit needs.
LIMIT_CONTROLLERS: Final[dict[str, str]] = {
    "memory_bytes": "memory",
    "cpu_millis": "cpu",
    "pids": "pids",
    "io_read_bps": "io",
    "io_write_bps": "io",
}


# The option that sets each limit, on `jobworker start` and in `serve --default-*/--max-*`.
LIMIT_OPTIONS: Final[dict[str, str]] = {
    "memory_bytes": "--memory",
    "cpu_millis": "--cpus",
    "pids": "--pids-limit",
    "io_read_bps": "--io-read-bps",
    "io_write_bps": "--io-write-bps",
}


def limit_options(names: Iterable[str]) -> str:
    """Limit field names as the options that set them: ``--cpus, --memory``."""
    return ", ".join(sorted(LIMIT_OPTIONS.get(name, name) for name in names))


@dataclass(frozen=True)
class Limits:
    """Resource limits for one job. ``None`` means "no limit"."""

    memory_bytes: int | None = None  # memory.max (and memory.swap.max = 0)
    cpu_millis: int | None = None  # cpu.max: 1000 = one whole CPU
    pids: int | None = None  # pids.max
    io_read_bps: int | None = None  # io.max rbps on the worker's block device
    io_write_bps: int | None = None  # io.max wbps on the worker's block device

    def items(self) -> dict[str, int]:
        """The limits that are set, by field name."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def validate(self) -> Limits:
        """Raise :class:`InvalidLimits` unless every set limit is in its range."""
        for name, value in self.items().items():
            low, high = LIMIT_RANGES[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidLimits(
                    f"{name} must be an integer from {low} to {high}, not {value!r}"
                )
        return self

    def over(self, defaults: Limits) -> Limits:
        """These limits, with every unset one taken from ``defaults``."""
        return Limits(**(defaults.items() | self.items()))

    def exceeding(self, maximum: Limits) -> dict[str, tuple[int, int]]:
        """The limits that are unset or above ``maximum``: name -> (value or 0, maximum)."""
        out: dict[str, tuple[int, int]] = {}
        mine = self.items()
        for name, top in maximum.items().items():
            value = mine.get(name)
            if value is None or value > top:
                out[name] = (value or 0, top)
        return out


class Network(enum.Enum):
    """The network a job sees."""

    HOST = "host"  # the host's network namespace
    NONE = "none"  # a network namespace of its own with only loopback, up


# The accepted range of a job's output cap (JobSpec.max_output), inclusive.
MAX_OUTPUT_RANGE: Final = (1 << 20, 1 << 62)

# The most a job's program, arguments and environment may take together, counted as the
# kernel counts them (each string with its NUL). Linux refuses more than 2 MiB at exec, and
# any single string over 128 KiB.
MAX_COMMAND_BYTES: Final = 256 * 1024
_MAX_STRING_BYTES: Final = 128 * 1024 - 1


def _check_string(what: str, value: object) -> int:
    """The size of one exec string, or :class:`InvalidCommand` if it cannot be one."""
    if not isinstance(value, str):
        raise InvalidCommand(f"{what} is not a string")
    if "\0" in value:
        raise InvalidCommand(f"{what} must not contain NUL bytes")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidCommand(f"{what} is not valid UTF-8") from None
    if size > _MAX_STRING_BYTES:
        raise InvalidCommand(f"{what} is {size} bytes long; the most is {_MAX_STRING_BYTES}")
    return size + 1


@dataclass(frozen=True)
class JobSpec:
    """What to run: a program, its arguments, environment, limits, and who asked.

    ``cwd`` is the directory the program starts in (``None``: the job's own working
    directory), ``user`` a host account the job runs as (``None``: the server's choice, see
    ``jobworker.worker.WorkerConfig``), ``network`` the network it sees (``None``:
    the server's default), ``max_output`` the most bytes of output the server keeps for it
    (``None``: the server's default): past it, the head and the tail of the output are kept
    and the bytes between them dropped.
    """

    program: str
    args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    owner: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    network: Network | None = None
    max_output: int | None = None
    owner_role: str = ""  # the role of the certificate that started it ("" in the library)

    def validate(self) -> JobSpec:
        """Raise :class:`InvalidCommand` or :class:`InvalidLimits` for a malformed spec."""
        if not isinstance(self.program, str) or not self.program:
            raise InvalidCommand("program must not be empty")
        size = _check_string("program", self.program)
        for i, arg in enumerate(self.args):
            size += _check_string(f"argument {i}", arg)
        for name, value in self.env.items():
            if not isinstance(name, str) or not name or "=" in name:
                raise InvalidCommand(
                    f"environment variable name {name!r} must be non-empty and without '='"
                )
            size += _check_string(f"environment variable {name!r}", f"{name}={value}")
        if size > MAX_COMMAND_BYTES:
            raise InvalidCommand(
                f"the program, its arguments and environment take {size} bytes; "
                f"the most is {MAX_COMMAND_BYTES}"
            )
        if self.cwd is not None:
            _check_string("working directory", self.cwd)
            if not self.cwd.startswith("/"):
                raise InvalidCommand(f"working directory {self.cwd!r} must be an absolute path")
        if self.user is not None:
            _check_string("user", self.user)
            if not self.user or "/" in self.user or ":" in self.user:
                raise InvalidCommand(f"user {self.user!r} is not an account name")
        if self.max_output is not None:
            low, high = MAX_OUTPUT_RANGE
            cap = self.max_output
            if isinstance(cap, bool) or not isinstance(cap, int) or not low <= cap <= high:
                raise InvalidLimits(
                    f"max_output must be an integer from {low} (1 MiB) to {high}, not {cap!r}"
                )
        self.limits.validate()
        return self


@dataclass(frozen=True)
class Usage:
    """Resources a job used, where the kernel reports them (``None``: not reported)."""

    cpu_usec: int | None = None  # cpu.stat usage_usec
    memory_peak_bytes: int | None = None  # memory.peak
    oom_kills: int | None = None  # memory.events oom_kill
    cpu_throttled_usec: int | None = None  # cpu.stat throttled_usec
    pids_limit_hits: int | None = None  # pids.events max: forks refused at pids.max
    io_read_bytes: int | None = None  # io.stat rbytes, all devices
    io_write_bytes: int | None = None  # io.stat wbytes, all devices


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job."""

    id: str
    state: JobState
    owner: str
    program: str
    args: tuple[str, ...]
    pid: int
    started_at: datetime
    ended_at: datetime | None = None
    exit_code: int | None = None  # set when the main process exited by itself
    signal: int | None = None  # set when the main process was killed by a signal
    oom_killed: bool = False
    limits: Limits = field(default_factory=Limits)  # the limits in force
    unenforced: frozenset[str] = frozenset()  # names of ``limits`` the host cannot enforce
    usage: Usage = field(default_factory=Usage)
    env: Mapping[str, str] = field(default_factory=dict)  # what the job asked for
    cwd: str = ""  # the directory the program started in
    user: str = ""  # the host account the job runs as; "" for a uid of the worker's own
    uid: int = 0
    network: Network = Network.HOST
    stopped_by: str = ""  # who asked for the stop that ended it (state STOPPED)
    max_output: int | None = None  # the output cap in force; None: unbounded
    output_bytes: int = 0  # bytes the job has written, dropped ones included
    output_dropped: int = 0  # bytes of its output dropped to keep within max_output
    output_lost: bool = False  # the disk filled while it ran: some of its writes may have failed
    owner_role: str = ""  # the role of the owner's certificate: a job belongs to name and role


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a job's output and where it starts in the log.

    A chunk with ``dropped`` set is a gap instead: it has no data, and says that the bytes
    ``offset`` to ``offset + dropped`` (exclusive) were dropped to keep the job's output
    within its cap. The next chunk starts where the gap ends.

    ``written_at`` is set only on a stream opened with timestamps: when the chunk's data had
    been written (UTC), as the server saw it; None in a gap, or where the server has no
    record of the time.
    """

    offset: int
    data: bytes
    dropped: int = 0
    written_at: datetime | None = None

    @property
    def end(self) -> int:
        """Where the next chunk starts."""
        return self.offset + (self.dropped or len(self.data))


# Sizes and CPU counts as people type them (docker's conventions).

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64k``, ``256M``, ``1.5G``, ``2GiB`` (units are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size: use a number with an optional k, M, G or T")
    value = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    return int(value)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``30s``, ``10m``, ``2h`` or ``7d``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use a number with an optional s, m, h or d")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_cpus(text: str) -> int:
    """Thousandths of a CPU from a CPU count such as ``0.5`` or ``2``."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of CPUs, such as 0.5 or 2") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"the number of CPUs must be positive, not {text!r}")
    return int(value * 1000)


def format_size(size: int) -> str:
    """The shortest exact form of ``size`` bytes that :func:`parse_size` reads back: ``256M``."""
    for unit in "TGMk":
        factor = _UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_cpus(millis: int) -> str:
    """A CPU count from thousandths of a CPU, as :func:`parse_cpus` reads it: ``0.5``."""
    text = f"{Decimal(millis) / 1000:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
