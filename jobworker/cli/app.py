"""The ``jobworker`` command: run the server, manage certificates, and drive jobs.

Commands are plain functions that call :func:`anyio.run`; every error is printed as one line
on stderr (no traceback) with a non-zero exit code: 1 for a failure, 2 for a usage error.
Client commands import nothing of the server, the worker or the PKI builder: those imports
are inside ``serve`` and ``certs``.
"""

import enum
import json
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import anyio
import typer
from typer._click.core import Command as ClickCommand
from typer._click.core import Context as ClickContext
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup
from typer.core import TyperOption as ClickOption
from typer.exceptions import Abort

from jobworker import __version__
from jobworker.cli import certs, coerce
from jobworker.cli.render import (
    LineStamper,
    short_command,
    status_json,
    status_lines,
    status_table,
    unique_prefix_length,
)
from jobworker.client.config import (
    DEFAULT_RECONNECT_FOR,
    DEFAULT_SERVER,
    default_data_dir,
    parse_timeout,
)
from jobworker.errors import ConfigError, CredentialsError, JobworkerError
from jobworker.models import (
    JobState,
    JobStatus,
    Limits,
    Network,
    OutputChunk,
    parse_cpus,
    parse_duration,
    parse_size,
)

if TYPE_CHECKING:
    from jobworker.client import Client, OutputReader

__all__ = ["app", "default_data_dir", "main"]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)
log = logging.getLogger("jobworker")

DEFAULT_LISTEN = "127.0.0.1:50051"
# Defaults of the worker (config.DEFAULT_JOB_UIDS) and of ServerLimits, written out so that
# client commands need not import the server or the worker (tests/test_cli.py ties them).
_DEFAULT_JOB_UIDS = "65536-99999"
_DEFAULT_MAX_CONNECTIONS = 1024
_DEFAULT_MAX_CONNECTIONS_PER_PEER = 128


class _Group(TyperGroup):
    """The top-level group: global options may also follow the command.

    Before parsing, every global option (as this group declares it, with its value) that
    follows the command word is moved in front of it, unless the command declares an option
    of that name itself (``wait --timeout`` is wait's own). Nothing after ``--`` moves, nor,
    for ``start`` and ``run``, anything from the job's program on.
    """

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._globals_first(ctx, args))

    def _options_of(self, ctx: ClickContext, name: str) -> frozenset[str]:
        """The option names the command ``name`` declares itself."""
        command = self.get_command(ctx, name)
        if command is None:
            return frozenset()
        return frozenset(
            opt for param in command.params if isinstance(param, ClickOption) for opt in param.opts
        )

    def _globals_first(self, ctx: ClickContext, args: list[str]) -> list[str]:
        takes_value = {
            name: not getattr(param, "is_flag", False)
            for param in self.params
            if isinstance(param, ClickOption)
            for name in param.opts
        }
        front: list[str] = []
        rest: list[str] = []
        command: str | None = None
        own: frozenset[str] = frozenset()
        i = 0
        while i < len(args):
            arg = args[i]
            name = arg.split("=", 1)[0]
            if arg == "--" or (command in _PASSTHROUGH_COMMANDS and not arg.startswith("-")):
                rest.extend(args[i:])
                break
            if name in takes_value and ((command is None and not rest) or name not in own):
                take = 2 if takes_value[name] and "=" not in arg else 1
                front.extend(args[i : i + take])
                i += take
                continue
            if command is None and not arg.startswith("-"):
                command = arg
                own = self._options_of(ctx, command)
            rest.append(arg)
            i += 1
        return front + rest


_PASSTHROUGH_COMMANDS = frozenset({"start", "run"})
_HELP_OPTIONS = ["-h", "--help"]

app = typer.Typer(
    name="jobworker",
    cls=_Group,
    help="Run programs on this host in their own cgroup, and stream their output, over mTLS.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": _HELP_OPTIONS},
)
app.add_typer(certs.app, name="certs")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` on the asyncio event loop; report errors as one line; Ctrl-C quietly."""
    try:
        return anyio.run(fn, backend="asyncio")
    except JobworkerError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# Client options (global: before or after the command).


@dataclass(frozen=True)
class _ClientOptions:
    server: str
    cert: Path | None
    key: Path | None
    ca: Path | None
    timeout: str | None

    def client(self, **settings: Any) -> "Client":
        """A client of the server these options name, with these files."""
        client_class = _client_class()
        return client_class(self.server, cert=self.cert, key=self.key, ca=self.ca, **settings)


def _client_class() -> type["Client"]:
    """The client library's :class:`Client`, loaded on first use (gRPC and the messages)."""
    with _pydantic_hidden():
        from jobworker.client import Client  # noqa: PLC0415 - only for commands that call
    return Client


@contextmanager
def _pydantic_hidden() -> Iterator[None]:
    """Keep pydantic out of the generated messages' import.

    betterproto2 imports pydantic whenever it is installed (typer needs it), only to tell
    pydantic dataclasses apart, which the generated messages are not. Hidden while they
    load, it stays out of this process: about 20 ms less for a CLI call, 3 MB less for a
    server. (This process is the CLI's, with one thread while it imports: a library would
    not do this to its host program.)
    """
    hide = "pydantic" not in sys.modules and "betterproto2" not in sys.modules
    if hide:
        sys.modules["pydantic"] = None  # type: ignore[assignment] # an import raises ImportError
    try:
        yield
    finally:
        if hide:
            del sys.modules["pydantic"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jobworker {__version__}")
        raise typer.Exit


@app.callback()
def _global_options(
    ctx: typer.Context,
    server: Annotated[
        str,
        typer.Option(
            envvar="JOBWORKER_SERVER", help="Server address: HOST:PORT, or HOST (port 50051)."
        ),
    ] = DEFAULT_SERVER,
    cert: Annotated[
        Path | None,
        typer.Option(
            envvar="JOBWORKER_CERT",
            help="Client certificate [default: admin.pem of the local server's PKI].",
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            envvar="JOBWORKER_KEY",
            help="Client private key [default: admin-key.pem of the local server's PKI].",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            envvar="JOBWORKER_CA",
            help="Server CA to trust [default: server-ca.pem of the local server's PKI].",
        ),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_TIMEOUT",
            metavar="SECONDS",
            help="How long a call may take to answer, 0 for no limit [default: 10].",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = _ClientOptions(server, cert, key, ca, timeout)


def _client(ctx: typer.Context, reconnect_for: float = DEFAULT_RECONNECT_FOR) -> "Client":
    options = ctx.find_object(_ClientOptions)
    assert options is not None  # set by the group's callback
    settings: dict[str, Any] = {"reconnect_for": reconnect_for}
    try:
        if options.timeout is not None:
            settings["timeout"] = parse_timeout(options.timeout)
        return options.client(**settings)
    except CredentialsError as exc:
        setting = exc.setting or "cert"
        _fail(f"{exc.message}; give --{setting} FILE (or JOBWORKER_{setting.upper()})")
    except JobworkerError as exc:
        _fail(exc.message)


def with_client(
    ctx: typer.Context,
    fn: Callable[["Client"], Awaitable[T]],
    reconnect_for: float = DEFAULT_RECONNECT_FOR,
) -> T:
    """Run ``fn`` with a connected client built from the global options; errors as one line."""
    client = _client(ctx, reconnect_for)

    async def go() -> T:
        async with client:
            return await fn(client)

    return _run(go)


async def _job_id(client: "Client", text: str) -> str:
    """A job id from a full id or a unique prefix of one (as ``list`` shows them)."""
    if len(text) >= 36 or not text or text.strip("0123456789abcdefABCDEF-"):
        return text  # a whole id, or not an id at all: the server says which
    found = [job.id for job in await client.list() if job.id.startswith(text.lower())]
    if len(found) == 1:
        return found[0]
    if not found:
        raise JobworkerError(f"no job id starts with {text!r}")
    raise JobworkerError(f"{len(found)} job ids start with {text!r}; give more of the id")


# Limit options, named as docker names them.

_Memory = Annotated[str | None, typer.Option("--memory", "-m", help="Memory limit, e.g. 256M.")]
_Cpus = Annotated[str | None, typer.Option("--cpus", help="CPU limit in CPUs, e.g. 0.5.")]
_Pids = Annotated[int | None, typer.Option("--pids-limit", help="Maximum number of processes.")]
_IoRead = Annotated[
    str | None, typer.Option("--io-read-bps", help="Read limit per second, e.g. 10M.")
]
_IoWrite = Annotated[
    str | None, typer.Option("--io-write-bps", help="Write limit per second, e.g. 10M.")
]
_Command = Annotated[list[str], typer.Argument(metavar="-- PROGRAM [ARGS]...", show_default=False)]
_Env = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", metavar="NAME=VALUE", help="Environment variable (repeatable)."),
]
_Cwd = Annotated[
    str | None,
    typer.Option("--cwd", help="Directory to start in (default: the job's own directory)."),
]
_User = Annotated[
    str | None,
    typer.Option(
        "--user", help="Run as this host account (admins only; the server must allow it)."
    ),
]
_Network = Annotated[
    Network | None,
    typer.Option("--network", help="host, or none: loopback only (default: the server's choice)."),
]
_MaxOutput = Annotated[
    str | None,
    typer.Option(
        "--max-output",
        metavar="SIZE",
        help="Most output the server keeps, e.g. 64M; past it the head and tail are kept.",
    ),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_ReconnectFor = Annotated[
    float,
    typer.Option(
        "--reconnect-for",
        metavar="SECONDS",
        min=0,
        help="If the server goes away, keep reconnecting this long (0: never).",
    ),
]
# Seconds the shell's completion of a job id waits for the server before offering nothing.
_COMPLETION_TIMEOUT = 2.0


def _complete_job_ids(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """The shell's completion of a job id: the ids of the jobs the caller may see that start
    with what was typed, each with its state and command; nothing if the server cannot say.
    (The group's callback does not run while completing: its options are read here.)"""
    given = ctx.find_root().params
    server = given.get("server") or DEFAULT_SERVER
    options = _ClientOptions(server, given.get("cert"), given.get("key"), given.get("ca"), None)

    async def jobs() -> list[JobStatus]:
        async with options.client(timeout=_COMPLETION_TIMEOUT) as client:
            return await client.list()

    try:
        found = anyio.run(jobs, backend="asyncio")
    except (JobworkerError, OSError):
        return []
    prefix = incomplete.lower()
    return [
        (job.id, f"{job.state.value}: {short_command(job)}")
        for job in found
        if job.id.startswith(prefix)
    ]


_JobId = Annotated[
    str,
    typer.Argument(
        metavar="JOB_ID", help="A job id or a unique prefix.", autocompletion=_complete_job_ids
    ),
]
_JobIds = Annotated[
    list[str],
    typer.Argument(metavar="JOB_ID...", show_default=False, autocompletion=_complete_job_ids),
]


@dataclass(frozen=True)
class _Placement:
    """Where and as whom a job runs: the options start and run share."""

    env: dict[str, str]
    cwd: str | None
    user: str | None
    network: Network | None
    max_output: int | None = None


def _placement(
    env: list[str] | None,
    cwd: str | None,
    user: str | None,
    network: Network | None,
    max_output: str | None = None,
) -> _Placement:
    variables = {}
    for item in env or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail(f"--env takes NAME=VALUE, not {item!r}")
        variables[name] = value
    return _Placement(variables, cwd, user, network, _size("--max-output", max_output))


def _size(option: str, text: str | None) -> int | None:
    try:
        return None if text is None else parse_size(text)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


def _encodable(command: list[str]) -> list[str]:
    """The command, or one error line for an argument that is not valid UTF-8."""
    for arg in command:
        try:
            arg.encode()
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape")
            _fail(f"argument {shown!r} is not valid UTF-8; jobworker sends text arguments only")
    return command


async def _start(
    client: "Client", command: list[str], limits: Limits, placement: _Placement
) -> JobStatus:
    return await client.start(
        command[0],
        command[1:],
        limits,
        env=placement.env,
        cwd=placement.cwd,
        user=placement.user,
        network=placement.network,
        max_output=placement.max_output,
    )


def _limits(
    memory: str | None, cpus: str | None, pids: int | None, rbps: str | None, wbps: str | None
) -> Limits:
    try:
        return Limits(
            memory_bytes=parse_size(memory) if memory is not None else None,
            cpu_millis=parse_cpus(cpus) if cpus is not None else None,
            pids=pids,
            io_read_bps=parse_size(rbps) if rbps is not None else None,
            io_write_bps=parse_size(wbps) if wbps is not None else None,
        ).validate()
    except (ValueError, JobworkerError) as exc:
        _fail(str(exc))


_PASSTHROUGH = {"allow_interspersed_args": False}


def _print_status(status: JobStatus, json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps(status_json(status), indent=2))
    else:
        typer.echo("\n".join(status_lines(status)))


@app.command(context_settings=_PASSTHROUGH)
def start(
    ctx: typer.Context,
    command: _Command,
    memory: _Memory = None,
    cpus: _Cpus = None,
    pids_limit: _Pids = None,
    io_read_bps: _IoRead = None,
    io_write_bps: _IoWrite = None,
    env: _Env = None,
    cwd: _Cwd = None,
    user: _User = None,
    network: _Network = None,
    max_output: _MaxOutput = None,
    json_output: _Json = False,
) -> None:
    """Start a job; print its id (or its status with --json)."""
    limits = _limits(memory, cpus, pids_limit, io_read_bps, io_write_bps)
    placement = _placement(env, cwd, user, network, max_output)
    command = _encodable(command)

    async def go(client: "Client") -> JobStatus:
        return await _start(client, command, limits, placement)

    started = with_client(ctx, go)
    if json_output:
        _print_status(started, json_output=True)
    else:
        typer.echo(started.id)


@app.command()
def stop(ctx: typer.Context, job_id: _JobId, json_output: _Json = False) -> None:
    """Stop a job: SIGTERM, a grace period, then SIGKILL to its whole process tree."""

    async def go(client: "Client") -> JobStatus:
        full_id = await _job_id(client, job_id)
        typer.echo(
            f"stopping job {full_id}: SIGTERM now, SIGKILL after the server's grace period",
            err=True,
        )
        return await client.stop(full_id)

    _print_status(with_client(ctx, go), json_output)


@app.command()
def status(ctx: typer.Context, job_id: _JobId, json_output: _Json = False) -> None:
    """Show a job's status."""

    async def go(client: "Client") -> JobStatus:
        return await client.status(await _job_id(client, job_id))

    _print_status(with_client(ctx, go), json_output)


@app.command("rm")
def remove(
    ctx: typer.Context,
    job_ids: _JobIds,
) -> None:
    """Remove ended jobs: their records, output and working directories."""

    async def go(client: "Client") -> None:
        for text in job_ids:
            removed = await client.remove(await _job_id(client, text))
            typer.echo(removed.id)

    with_client(ctx, go)


@app.command()
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Only jobs that ended this long ago, e.g. 30m, 12h, 7d [default: all].",
        ),
    ] = None,
) -> None:
    """Remove every ended job you may see (or those that ended --older-than ago)."""
    seconds = _duration("--older-than", older_than)
    for job_id in with_client(ctx, lambda client: client.prune(seconds)):
        typer.echo(job_id)


def _duration(option: str, text: str | None) -> float | None:
    try:
        return None if text is None else parse_duration(text)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    json_output: _Json = False,
    state: Annotated[
        list[JobState] | None,
        typer.Option("--state", help="Only jobs in this state (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job ids.")] = False,
    no_trunc: Annotated[
        bool, typer.Option("--no-trunc", help="Whole ids and commands in the table.")
    ] = False,
) -> None:
    """List the jobs you may see, oldest first (ids in the table are short: any unique
    prefix of an id names its job)."""
    visible = with_client(ctx, lambda client: client.list())
    jobs = [job for job in visible if job.state in state] if state else visible
    if quiet:
        for job in jobs:
            typer.echo(job.id)
    elif json_output:
        typer.echo(json.dumps([status_json(j) for j in jobs], indent=2))
    else:
        # Short ids that tell apart every job the caller sees, not only those shown.
        length = unique_prefix_length([job.id for job in visible])
        typer.echo("\n".join(status_table(jobs, truncate=not no_trunc, id_length=length)))


def _streaming() -> None:
    """Set the C allocator as a process that streams output wants it (``jobworker/malloc.py``:
    a large output read about 1.7x as fast)."""
    from jobworker.malloc import tune_malloc  # noqa: PLC0415 - only the commands that stream

    tune_malloc()


def _write(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


def _gap_line(chunk: OutputChunk) -> None:
    typer.echo(
        f"jobworker: bytes {chunk.offset}..{chunk.end} of the output were dropped "
        "(the job's output cap keeps its head and tail)",
        err=True,
    )


def _text(chunk: OutputChunk, stamper: LineStamper | None) -> bytes:
    """A chunk's data as printed: with each line's time in front if ``stamper``."""
    return chunk.data if stamper is None else stamper(chunk.data, chunk.written_at)


async def _copy_rest(output: "OutputReader", stamper: LineStamper | None = None) -> None:
    """Copy the output to stdout until the job ends; each gap is one line on stderr."""
    while (chunk := await output.next_chunk()) is not None:
        if chunk.dropped:
            _gap_line(chunk)
        else:
            _write(_text(chunk, stamper))


async def _copy_output(
    client: "Client", job_id: str, offset: int, *, timestamps: bool = False
) -> None:
    _streaming()
    async with client.output(job_id, offset, timestamps=timestamps) as output:
        await _copy_rest(output, LineStamper() if timestamps else None)


_Timestamps = Annotated[
    bool,
    typer.Option(
        "--timestamps",
        "-t",
        help="Put the time each line was written in front of it (local time; within a "
        "millisecond, or a quarter second for a job that writes more than 4 times a second).",
    ),
]


@app.command()
def stream(
    ctx: typer.Context,
    job_id: _JobId,
    offset: Annotated[int, typer.Option(help="Start at this byte of the output.", min=0)] = 0,
    timestamps: _Timestamps = False,
    reconnect_for: _ReconnectFor = DEFAULT_RECONNECT_FOR,
) -> None:
    """Write a job's output to stdout, from the start (or --offset), until the job ends."""

    async def go(client: "Client") -> None:
        await _copy_output(client, await _job_id(client, job_id), offset, timestamps=timestamps)

    with_client(ctx, go, reconnect_for)


# How long `logs` without -f waits for more output before it takes what came as all there is.
_LOGS_SETTLE = 0.25


async def _settled_chunk(output: "OutputReader") -> OutputChunk | None:
    """The next chunk, or None once the job ended or nothing more came for a moment."""
    with anyio.move_on_after(_LOGS_SETTLE):
        chunk = await output.next_chunk()
        if chunk is not None and chunk.dropped:
            _gap_line(chunk)
        return chunk
    return None


@app.command()
def logs(
    ctx: typer.Context,
    job_id: _JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep following until the job ends.")
    ] = False,
    tail: Annotated[
        int | None,
        typer.Option("--tail", "-n", metavar="N", min=0, help="Only the last N lines."),
    ] = None,
    timestamps: _Timestamps = False,
) -> None:
    """Print a job's output so far and exit; with -f, follow it until the job ends."""
    stamper = LineStamper() if timestamps else None

    async def go(client: "Client") -> None:
        lines: deque[bytes] = deque(maxlen=tail)
        pending = b""
        full_id = await _job_id(client, job_id)
        _streaming()
        async with client.output(full_id, timestamps=timestamps) as output:
            while (chunk := await _settled_chunk(output)) is not None:
                data = _text(chunk, stamper)
                if tail is None:
                    _write(data)
                    continue
                pending += data
                *complete, pending = pending.split(b"\n")
                lines.extend(line + b"\n" for line in complete)
            if tail is not None:
                if pending:
                    lines.append(pending)
                _write(b"".join(list(lines)[-tail:] if tail else []))
            if follow:
                await _copy_rest(output, stamper)

    with_client(ctx, go)


@app.command()
def wait(
    ctx: typer.Context,
    job_ids: _JobIds,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", help="Give up after this long (exit 1)."),
    ] = None,
) -> None:
    """Wait until the jobs have ended; exit with the last one's exit code (128+signal)."""

    async def go(client: "Client") -> int:
        code = 0
        with anyio.fail_after(timeout) if timeout is not None else _no_limit():
            for text in job_ids:
                code = _exit_code(await client.wait(await _job_id(client, text)))
        return code

    try:
        raise typer.Exit(with_client(ctx, go))
    except TimeoutError:
        _fail(f"the jobs were still running after {timeout:g} s")


def _no_limit() -> anyio.CancelScope:
    return anyio.CancelScope()


def _exit_code(final: JobStatus) -> int:
    if final.signal is not None:
        return 128 + final.signal
    return final.exit_code or 0


@app.command(context_settings=_PASSTHROUGH)
def run(
    ctx: typer.Context,
    command: _Command,
    memory: _Memory = None,
    cpus: _Cpus = None,
    pids_limit: _Pids = None,
    io_read_bps: _IoRead = None,
    io_write_bps: _IoWrite = None,
    env: _Env = None,
    cwd: _Cwd = None,
    user: _User = None,
    network: _Network = None,
    max_output: _MaxOutput = None,
    reconnect_for: _ReconnectFor = DEFAULT_RECONNECT_FOR,
) -> None:
    """Start a job, stream its output, and exit with its exit code (128+signal if killed).

    On Ctrl-C the job keeps running, and its id is printed on stderr.
    """
    limits = _limits(memory, cpus, pids_limit, io_read_bps, io_write_bps)
    placement = _placement(env, cwd, user, network, max_output)
    command = _encodable(command)
    started: list[str] = []

    async def go(client: "Client") -> int:
        job = await _start(client, command, limits, placement)
        started.append(job.id)
        await _copy_output(client, job.id, 0)
        final = await client.status(job.id)
        if final.state is JobState.RUNNING:  # pragma: no cover - output ends only at the end
            return 1
        return _exit_code(final)

    try:
        code = with_client(ctx, go, reconnect_for)
    except typer.Exit as exc:
        if exc.exit_code == 130 and started:
            typer.echo(f"job {started[0]} keeps running; jobworker stop {started[0]}", err=True)
        raise
    raise typer.Exit(code)


# The server.


@app.command(name="serve")
def serve_command(
    listen: Annotated[
        str, typer.Option(envvar="JOBWORKER_LISTEN", help="Address to listen on, HOST:PORT.")
    ] = DEFAULT_LISTEN,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="JOBWORKER_DATA_DIR",
            help="Logs and the PKI [default: /var/lib/jobworker as root, else under XDG state].",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(envvar="JOBWORKER_TLS_CERT", help="Server certificate.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="JOBWORKER_TLS_KEY", help="Server private key.")
    ] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(envvar="JOBWORKER_CLIENT_CA", help="CA that signs client certificates."),
    ] = None,
    cgroup_root: Annotated[
        Path | None,
        typer.Option(
            envvar="JOBWORKER_CGROUP_ROOT",
            help="cgroup v2 directory delegated to the worker [default: its own cgroup].",
        ),
    ] = None,
    stop_grace: Annotated[
        float,
        typer.Option(envvar="JOBWORKER_STOP_GRACE", help="Seconds between SIGTERM and SIGKILL."),
    ] = 10.0,
    chunk_size: Annotated[
        int, typer.Option(envvar="JOBWORKER_CHUNK_SIZE", help="Largest output chunk in bytes.")
    ] = 256 * 1024,
    default_memory: Annotated[
        str | None,
        typer.Option(envvar="JOBWORKER_DEFAULT_MEMORY", help="Memory limit of jobs that set none."),
    ] = None,
    default_cpus: Annotated[
        str | None,
        typer.Option(envvar="JOBWORKER_DEFAULT_CPUS", help="CPU limit of jobs that set none."),
    ] = None,
    default_pids_limit: Annotated[
        int | None,
        typer.Option(
            envvar="JOBWORKER_DEFAULT_PIDS_LIMIT", help="Process limit of jobs that set none."
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(envvar="JOBWORKER_MAX_MEMORY", help="Highest memory limit a job may ask for."),
    ] = None,
    max_cpus: Annotated[
        str | None,
        typer.Option(envvar="JOBWORKER_MAX_CPUS", help="Highest CPU limit a job may ask for."),
    ] = None,
    max_pids_limit: Annotated[
        int | None,
        typer.Option(
            envvar="JOBWORKER_MAX_PIDS_LIMIT", help="Highest process limit a job may ask for."
        ),
    ] = None,
    job_uids: Annotated[
        str,
        typer.Option(
            envvar="JOBWORKER_JOB_UIDS",
            metavar="FIRST-LAST",
            help="Unprivileged uids for jobs, one per running job; none may be a host account.",
        ),
    ] = _DEFAULT_JOB_UIDS,
    run_as: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_RUN_AS",
            metavar="USER",
            help="Run every job as this host account instead of a uid of its own.",
        ),
    ] = None,
    allow_user: Annotated[
        list[str] | None,
        typer.Option(
            envvar="JOBWORKER_ALLOW_USERS",
            metavar="USER",
            help="A host account admins may run jobs as with start --user (repeatable).",
        ),
    ] = None,
    default_network: Annotated[
        Network,
        typer.Option(envvar="JOBWORKER_DEFAULT_NETWORK", help="Network of jobs that choose none."),
    ] = Network.HOST,
    max_message_size: Annotated[
        str,
        typer.Option(
            envvar="JOBWORKER_MAX_MESSAGE_SIZE",
            help="Largest request message; larger ones get RESOURCE_EXHAUSTED unread.",
        ),
    ] = "4M",
    max_connections: Annotated[
        int,
        typer.Option(
            envvar="JOBWORKER_MAX_CONNECTIONS",
            min=1,
            help="Open connections in all; more are closed before TLS.",
        ),
    ] = _DEFAULT_MAX_CONNECTIONS,
    max_connections_per_peer: Annotated[
        int,
        typer.Option(
            envvar="JOBWORKER_MAX_CONNECTIONS_PER_PEER",
            min=1,
            help="Open connections from one IP address; more are closed before TLS.",
        ),
    ] = _DEFAULT_MAX_CONNECTIONS_PER_PEER,
    default_max_output: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_DEFAULT_MAX_OUTPUT",
            metavar="SIZE",
            help="Output cap of jobs that set none, e.g. 64M [default: none, or the maximum].",
        ),
    ] = None,
    max_max_output: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_MAX_MAX_OUTPUT",
            metavar="SIZE",
            help="Highest output cap a job may ask for.",
        ),
    ] = None,
    retain_for: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_RETAIN_FOR",
            metavar="DURATION",
            help="Remove ended jobs this long after they end, e.g. 7d [default: keep].",
        ),
    ] = None,
    retain_jobs: Annotated[
        int | None,
        typer.Option(
            envvar="JOBWORKER_RETAIN_JOBS",
            metavar="N",
            min=0,
            help="Keep only the newest N ended jobs [default: all].",
        ),
    ] = None,
    min_free: Annotated[
        str | None,
        typer.Option(
            envvar="JOBWORKER_MIN_FREE",
            metavar="SIZE|PERCENT",
            help="Refuse new jobs while the data directory's disk has less free, e.g. 1G or 5%.",
        ),
    ] = None,
    on_exit: Annotated[
        str,
        typer.Option(
            envvar="JOBWORKER_ON_EXIT",
            metavar="stop|keep",
            help="On SIGTERM: stop the running jobs, or keep them for the next server to adopt.",
        ),
    ] = "stop",
) -> None:
    """Run the jobworker server until SIGTERM or SIGINT."""
    with _pydantic_hidden():
        from jobworker.server.app import ServerConfig, parse_listen, serve  # noqa: PLC0415
    from jobworker.server.limits import ServerLimits  # noqa: PLC0415
    from jobworker.worker import WorkerConfig  # noqa: PLC0415
    from jobworker.worker.config import MinFree, OnExit, parse_uid_range  # noqa: PLC0415

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        host, port = parse_listen(listen)
        data = data_dir or default_data_dir()
        tls = _server_tls(data, host, tls_cert, tls_key, client_ca)
        worker = WorkerConfig(
            data_dir=data,
            cgroup_root=cgroup_root,
            chunk_size=chunk_size,
            stop_grace=stop_grace,
            default_limits=_limits(default_memory, default_cpus, default_pids_limit, None, None),
            max_limits=_limits(max_memory, max_cpus, max_pids_limit, None, None),
            job_uids=parse_uid_range(job_uids),
            run_as=run_as,
            allowed_users=frozenset(allow_user or ()),
            default_network=default_network,
            on_exit=_on_exit(on_exit, OnExit),
            default_max_output=_size("--default-max-output", default_max_output),
            max_max_output=_size("--max-max-output", max_max_output),
            min_free=MinFree.parse(min_free) if min_free is not None else None,
            retain_for=_duration("--retain-for", retain_for),
            retain_jobs=retain_jobs,
        ).validate()
    except JobworkerError as exc:
        _fail(exc.message)
    try:
        limits = ServerLimits(
            max_message_size=parse_size(max_message_size),
            max_connections=max_connections,
            max_connections_per_peer=max_connections_per_peer,
        ).validate()
    except (ValueError, JobworkerError) as exc:
        _fail(exc.message if isinstance(exc, JobworkerError) else str(exc))
    config = ServerConfig(
        worker=worker,
        tls_cert=tls[0],
        tls_key=tls[1],
        client_ca=tls[2],
        host=host,
        port=port,
        limits=limits,
    )
    _run(lambda: serve(config))


def _on_exit(text: str, kind: type[E]) -> E:
    try:
        return kind(text)
    except ValueError:
        _fail(f"--on-exit takes stop or keep, not {text!r}", 2)


def _server_tls(
    data_dir: Path, host: str, cert: Path | None, key: Path | None, client_ca: Path | None
) -> tuple[Path, Path, Path]:
    from jobworker.certs import PkiPaths, init_pki  # noqa: PLC0415 - only serve needs it

    given = [p for p in (cert, key, client_ca) if p is not None]
    if given and len(given) < 3:
        raise ConfigError("give all of --tls-cert, --tls-key and --client-ca, or none of them")
    if cert is not None and key is not None and client_ca is not None:
        return cert, key, client_ca
    pki = PkiPaths.in_dir(data_dir / "pki")
    if not pki.exists():
        hosts = [] if host in ("0.0.0.0", "::", "") else [host]
        init_pki(pki.directory, hosts)
        log.info("created a PKI in %s; clients on this host use %s", pki.directory, pki.admin_cert)
    return pki.server_cert, pki.server_key, pki.client_ca


def _command() -> ClickCommand:
    command = typer.main.get_command(app)
    coerce.install(command, _HELP_OPTIONS)
    return command


def top_level_help() -> str:
    """``jobworker --help`` as typer renders it on a terminal of 80 columns or more.

    ``jobworker/cli/_help.py`` keeps a copy, which :func:`jobworker.cli.main` prints without
    loading typer; ``nox -s help`` writes it again, and a test fails while it differs.
    """
    command = _command()
    # Click wraps help at the terminal's width less 2, and at 78 columns at most.
    with command.make_context("jobworker", [], resilient_parsing=True, terminal_width=78) as ctx:
        return command.get_help(ctx) + "\n"


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line; a usage error is one ``error:`` line and exit code 2."""
    command = _command()
    try:
        code = command.main(args, prog_name="jobworker", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.format_message())
        code = 0
    except UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        code = 2
    except Abort:
        code = 130
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)
