"""The client library against a real server: error classes, deadlines, files, wait, and
output streams that survive the server going away and coming back (through a TCP relay
that the test cuts and restores)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import JOB_PYTHON, free_port

from jobworker.certs import PkiPaths, init_pki
from jobworker.client import Client
from jobworker.client.config import parse_target
from jobworker.errors import (
    CredentialsError,
    DeadlineExceeded,
    InvalidCommand,
    InvalidJobId,
    JobNotFound,
    TlsError,
    Unavailable,
    error_from_status,
)
from jobworker.models import JobState
from jobworker.server.app import JobworkerServer, ServerConfig
from jobworker.worker import WorkerConfig

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"


@pytest.fixture(scope="module")
def pki_paths(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def server(config: WorkerConfig, pki_paths: PkiPaths) -> AsyncIterator[JobworkerServer]:
    server_config = ServerConfig(
        worker=dataclasses.replace(config, chunk_size=4096),
        tls_cert=pki_paths.server_cert,
        tls_key=pki_paths.server_key,
        client_ca=pki_paths.client_ca,
        port=0,
    )
    async with JobworkerServer(server_config) as running:
        yield running


def make_client(pki_paths: PkiPaths, port: int, **settings: float) -> Client:
    return Client(
        f"127.0.0.1:{port}",
        cert=pki_paths.admin_cert,
        key=pki_paths.admin_key,
        ca=pki_paths.server_ca,
        **settings,
    )


async def test_the_servers_exact_error_class_arrives(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    async with make_client(pki_paths, server.port) as client:
        with pytest.raises(InvalidCommand) as started:
            await client.start("no-such-program-here")
        with pytest.raises(InvalidJobId):
            await client.status("not-a-job")
        with pytest.raises(JobNotFound):
            await client.stop(UNKNOWN_ID)
    assert type(started.value) is InvalidCommand
    assert "no-such-program-here" in started.value.message


def test_a_class_name_from_the_wire_never_picks_a_class_of_another_status() -> None:
    from grpclib.const import Status

    assert type(error_from_status(Status.INVALID_ARGUMENT, "m", "InvalidLimits")).__name__ == (
        "InvalidLimits"
    )
    # JobNotFound travels as NOT_FOUND: named with another status, the status decides.
    assert type(error_from_status(Status.INVALID_ARGUMENT, "m", "JobNotFound")).__name__ == (
        "InvalidArgument"
    )
    assert type(error_from_status(Status.NOT_FOUND, "m", "os.system")).__name__ == "JobNotFound"


async def test_a_server_that_never_answers_is_deadline_exceeded_not_unreachable(
    pki_paths: PkiPaths,
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept TCP, never speak TLS

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with make_client(pki_paths, port, timeout=0.5) as client:
            with pytest.raises(DeadlineExceeded) as raised:
                await client.list()
    finally:
        listener.close()
        for writer in accepted:
            writer.close()
    assert not isinstance(raised.value, Unavailable)
    assert "within 0.5 s" in raised.value.message


async def test_stop_waits_out_the_grace_period_beyond_the_call_timeout(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    # The job ignores SIGTERM: the server waits its whole grace (2 s) before SIGKILL.
    async with make_client(pki_paths, server.port, timeout=0.5, stop_grace=30) as client:
        job = await client.start(JOB_PYTHON, ["-c", _IGNORE_TERM])
        stopped = await client.stop(job.id)
    assert stopped.state is JobState.STOPPED


_IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True)"
    "\nwhile True: time.sleep(0.1)"
)


async def test_reading_output_outside_async_with_is_a_clear_error(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    async with make_client(pki_paths, server.port) as client:
        job = await client.start("true")
        reader = client.output(job.id)
        with pytest.raises(RuntimeError, match="inside 'async with"):
            async for _ in reader:
                pass
    with pytest.raises(RuntimeError, match="async with"):
        make_client(pki_paths, server.port).output(job.id)


def test_missing_or_corrupt_files_are_named(pki_paths: PkiPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CredentialsError, match=str(missing)) as raised:
        Client(cert=missing, key=pki_paths.admin_key, ca=pki_paths.server_ca)
    assert raised.value.setting == "cert"
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CredentialsError, match=str(corrupt)) as raised:
        Client(cert=pki_paths.admin_cert, key=pki_paths.admin_key, ca=corrupt)
    assert raised.value.setting == "ca"
    with pytest.raises(CredentialsError, match="does not belong") as raised:
        Client(cert=pki_paths.admin_cert, key=pki_paths.server_key, ca=pki_paths.server_ca)
    assert raised.value.setting == "key"


def test_targets_take_host_port_or_host_alone() -> None:
    assert parse_target("db1:7000") == ("db1", 7000)
    assert parse_target("db1") == ("db1", 50051)
    assert parse_target("[::1]:7000") == ("::1", 7000)
    assert parse_target("::1") == ("::1", 50051)


def test_from_env_reads_the_same_variables_as_the_cli(pki_paths: PkiPaths) -> None:
    client = Client.from_env(
        {
            "JOBWORKER_SERVER": "127.0.0.1:7000",
            "JOBWORKER_CERT": str(pki_paths.admin_cert),
            "JOBWORKER_KEY": str(pki_paths.admin_key),
            "JOBWORKER_CA": str(pki_paths.server_ca),
            "JOBWORKER_TIMEOUT": "2.5",
        }
    )
    assert (client.target, client.timeout, client.files.ca) == (
        "127.0.0.1:7000",
        2.5,
        pki_paths.server_ca,
    )


async def test_an_untrusted_server_names_the_ca_file(
    server: JobworkerServer, pki_paths: PkiPaths, tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other")
    client = Client(
        f"127.0.0.1:{server.port}",
        cert=pki_paths.admin_cert,
        key=pki_paths.admin_key,
        ca=other.server_ca,
    )
    async with client:
        with pytest.raises(TlsError, match=str(other.server_ca)):
            await client.list()


async def test_wait_returns_the_final_status_and_times_out_without_touching_the_job(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    async with make_client(pki_paths, server.port) as client:
        job = await client.start("sh", ["-c", "sleep 0.3; exit 7"])
        final = await client.wait(job.id)
        assert (final.state, final.exit_code) == (JobState.COMPLETED, 7)
        assert (await client.wait(job.id)).exit_code == 7  # already ended
        sleeper = await client.start("sleep", ["60"])
        with pytest.raises(DeadlineExceeded, match="still running"):
            await client.wait(sleeper.id, timeout=0.3)
        assert (await client.status(sleeper.id)).state is JobState.RUNNING
        await client.stop(sleeper.id)


class Relay:
    """A TCP relay to the server that the test can cut (all connections, and the listener)
    and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()

    async def up(self) -> None:
        self._listener = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)
        self._listener = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pumps, return_exceptions=True)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


# 200 KiB of numbered lines over about a second, so that the cut falls while the job still
# writes: any gap or repeat shows in the comparison.
_LINES = 20_000
_PRINT_LINES = (
    "import sys, time\n"
    f"for i in range({_LINES}):\n"
    "    sys.stdout.write('%09d\\n' % i)\n"
    "    if i % 1000 == 999: sys.stdout.flush(); time.sleep(0.05)\n"
)
_EXPECTED = b"".join(b"%09d\n" % i for i in range(_LINES))


async def test_output_resumes_after_the_connection_is_cut_without_gap_or_repeat(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    relay = Relay(server.port)
    await relay.up()
    async with make_client(pki_paths, server.port) as direct:
        job = await direct.start(JOB_PYTHON, ["-c", _PRINT_LINES])
    received = bytearray()
    async with (
        make_client(pki_paths, relay.port, reconnect_for=20) as client,
        client.output(job.id) as output,
    ):
        first = await output.next_chunk()
        assert first is not None
        received += first.data
        await relay.cut()
        restore = asyncio.get_running_loop().call_later(
            0.5, lambda: asyncio.ensure_future(relay.up())
        )
        async for data in output:
            received += data
        restore.cancel()
    assert output.reconnects >= 1, "the stream was never cut: the test proves nothing"
    assert bytes(received) == _EXPECTED
    await relay.cut()
    await asyncio.sleep(0.1)  # the relay's own tasks end here, not in the server's teardown


async def test_output_gives_up_after_reconnect_for_with_one_clear_error(
    server: JobworkerServer, pki_paths: PkiPaths
) -> None:
    relay = Relay(server.port)
    await relay.up()
    async with make_client(pki_paths, server.port) as direct:
        job = await direct.start("sh", ["-c", "echo up; exec sleep 60"])

    async def read_while_cutting(client: Client) -> None:
        async with client.output(job.id) as output:
            async for _ in output:
                await relay.cut()

    async with make_client(pki_paths, relay.port, reconnect_for=0.5) as client:
        with pytest.raises(Unavailable) as raised:
            await read_while_cutting(client)
    assert "could not reconnect" in raised.value.message
    assert "within 0.5 s" in raised.value.message
    async with make_client(pki_paths, server.port) as direct:
        assert (await direct.status(job.id)).state is JobState.RUNNING
        await direct.stop(job.id)


def test_the_client_loads_no_server_worker_cgroup_or_pki_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, jobworker.models\n"
        "from jobworker.client import Client\n"
        "assert 'jobworker.client.client' in sys.modules\n"
        "bad = [m for m in sys.modules if m.startswith(('jobworker.server', 'jobworker.worker',"
        " 'jobworker.certs', 'jobworker.auth', 'cryptography'))]\n"
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
