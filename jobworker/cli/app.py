"""The ``jobworker`` command: run the server, manage certificates, and drive jobs.

Commands are plain functions that call :func:`anyio.run`; every error is printed as one line
on stderr (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import anyio
import typer

from jobworker.certs import PkiPaths, init_pki
from jobworker.cli import certs
from jobworker.cli.render import status_json, status_lines, status_table
from jobworker.client import Client
from jobworker.errors import ConfigError, JobworkerError
from jobworker.models import parse_cpus, parse_size
from jobworker.server.app import ServerConfig, parse_listen, serve
from jobworker.server.limits import ServerLimits
from jobworker.worker import JobState, JobStatus, Limits, Network, WorkerConfig
from jobworker.worker.config import DEFAULT_JOB_UIDS, parse_uid_range

__all__ = ["app", "default_data_dir", "main"]

T = TypeVar("T")
log = logging.getLogger("jobworker")

app = typer.Typer(
    name="jobworker",
    help="Run programs on this host in their own cgroup, and stream their output, over mTLS.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(certs.app, name="certs")

DEFAULT_LISTEN = "127.0.0.1:50051"


def default_data_dir() -> Path:
    """/var/lib/jobworker for root, else the XDG state directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/jobworker")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "jobworker"


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


# Client options (global: before the command).


class _ClientOptions:
    server = DEFAULT_LISTEN
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


_client_options = _ClientOptions()


@app.callback()
def _global_options(
    server: Annotated[
        str, typer.Option(envvar="JOBWORKER_SERVER", help="Server address, HOST:PORT.")
    ] = DEFAULT_LISTEN,
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
) -> None:
    _client_options.server = server
    _client_options.cert, _client_options.key, _client_options.ca = cert, key, ca


def _client() -> Client:
    try:
        host, port = parse_listen(_client_options.server)
    except ConfigError as exc:
        _fail(exc.message)
    local = PkiPaths.in_dir(default_data_dir() / "pki")
    cert = _client_options.cert or local.admin_cert
    key = _client_options.key or local.admin_key
    ca = _client_options.ca or local.server_ca
    for what, path, option in (
        ("certificate", cert, "--cert"),
        ("key", key, "--key"),
        ("CA", ca, "--ca"),
    ):
        if not path.is_file():
            _fail(
                f"client {what} {path} not found; give {option} (or JOBWORKER_{option[2:].upper()})"
            )
    try:
        return Client(host, port, cert=cert, key=key, ca=ca)
    except (OSError, ValueError) as exc:
        _fail(f"cannot load the client certificate, key or CA: {exc}")


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


@dataclass(frozen=True)
class _Placement:
    """Where and as whom a job runs: the options start and run share."""

    env: dict[str, str]
    cwd: str | None
    user: str | None
    network: Network | None


def _placement(
    env: list[str] | None, cwd: str | None, user: str | None, network: Network | None
) -> _Placement:
    variables = {}
    for item in env or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail(f"--env takes NAME=VALUE, not {item!r}")
        variables[name] = value
    return _Placement(variables, cwd, user, network)


async def _start(
    client: Client, command: list[str], limits: Limits, placement: _Placement
) -> JobStatus:
    return await client.start(
        command[0],
        command[1:],
        limits,
        env=placement.env,
        cwd=placement.cwd,
        user=placement.user,
        network=placement.network,
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


@app.command(context_settings=_PASSTHROUGH)
def start(
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
) -> None:
    """Start a job; print its id."""
    limits = _limits(memory, cpus, pids_limit, io_read_bps, io_write_bps)
    placement = _placement(env, cwd, user, network)
    client = _client()

    async def go() -> str:
        async with client:
            return (await _start(client, command, limits, placement)).id

    typer.echo(_run(go))


@app.command()
def stop(job_id: str) -> None:
    """Stop a job: SIGTERM, a grace period, then SIGKILL to its whole process tree."""
    client = _client()

    async def go() -> None:
        async with client:
            status = await client.stop(job_id)
        typer.echo("\n".join(status_lines(status)))

    _run(go)


@app.command()
def status(
    job_id: str, json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Show a job's status."""
    client = _client()

    async def go() -> None:
        async with client:
            result = await client.status(job_id)
        typer.echo(
            json.dumps(status_json(result), indent=2)
            if json_output
            else "\n".join(status_lines(result))
        )

    _run(go)


@app.command("list")
def list_jobs(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the jobs you may see."""
    client = _client()

    async def go() -> None:
        async with client:
            jobs = await client.list()
        if json_output:
            typer.echo(json.dumps([status_json(j) for j in jobs], indent=2))
        else:
            typer.echo("\n".join(status_table(jobs)))

    _run(go)


async def _copy_output(client: Client, job_id: str, offset: int) -> None:
    out = sys.stdout.buffer
    async with client.output(job_id, offset) as output:
        async for data in output:
            out.write(data)
            out.flush()


@app.command()
def stream(
    job_id: str,
    offset: Annotated[int, typer.Option(help="Start at this byte of the output.", min=0)] = 0,
) -> None:
    """Write a job's output to stdout, from the start (or --offset), until the job ends."""
    client = _client()

    async def go() -> None:
        async with client:
            await _copy_output(client, job_id, offset)

    _run(go)


@app.command(context_settings=_PASSTHROUGH)
def run(
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
) -> None:
    """Start a job, stream its output, and exit with its exit code (128+signal if killed)."""
    limits = _limits(memory, cpus, pids_limit, io_read_bps, io_write_bps)
    placement = _placement(env, cwd, user, network)
    client = _client()

    async def go() -> int:
        async with client:
            started = await _start(client, command, limits, placement)
            await _copy_output(client, started.id, 0)
            final = await client.status(started.id)
        if final.state is JobState.RUNNING:  # pragma: no cover - output ends only at the end
            return 1
        if final.signal is not None:
            return 128 + final.signal
        return final.exit_code or 0

    raise typer.Exit(_run(go))


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
    ] = "{}-{}".format(*DEFAULT_JOB_UIDS),
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
) -> None:
    """Run the jobworker server until SIGTERM or SIGINT."""
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
        ).validate()
    except JobworkerError as exc:
        _fail(exc.message)
    try:
        limits = ServerLimits(max_message_size=parse_size(max_message_size)).validate()
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


def _server_tls(
    data_dir: Path, host: str, cert: Path | None, key: Path | None, client_ca: Path | None
) -> tuple[Path, Path, Path]:
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


def main() -> None:
    app()
