"""The gRPC API end to end: a real server over mutual TLS on loopback, the real client."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from helpers import open_fds
from pki import write_client

from jobworker.auth.roles import ROLE_OID, Role, encode_utf8string
from jobworker.certs import (
    PkiPaths,
    create_client_cert,
    init_pki,
    issue_client,
    load_cert_and_key,
)
from jobworker.client import Client
from jobworker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    JobNotFound,
    JobworkerError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobworker.server.app import JobworkerServer, ServerConfig
from jobworker.server.limits import ServerLimits
from jobworker.worker import JobState, Limits, WorkerConfig

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"


@dataclass(frozen=True)
class Pki:
    paths: PkiPaths

    def client(self, port: int, name: str) -> Client:
        cert = self.paths.admin_cert if name == "admin" else self.paths.directory / f"{name}.pem"
        key = self.paths.admin_key if name == "admin" else self.paths.directory / f"{name}-key.pem"
        return Client("127.0.0.1", port, cert=cert, key=key, ca=self.paths.server_ca)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    paths = init_pki(directory)
    for name in ("alice", "bob"):
        issue_client(directory, name, "user")
    client_ca = load_cert_and_key(paths.client_ca, paths.client_ca_key)
    write_client(directory, "nobody", create_client_cert(client_ca, "nobody", None))
    # A user whose certificate is named like the admin's.
    write_client(directory, "fake-admin", create_client_cert(client_ca, "admin", Role.USER))
    unknown = x509.UnrecognizedExtension(ROLE_OID, encode_utf8string("root"))
    weird = create_client_cert(client_ca, "weird", None, extra_extensions=[unknown])
    write_client(directory, "weird", weird)
    return Pki(paths)


@pytest.fixture
async def server(config: WorkerConfig, pki: Pki) -> AsyncIterator[JobworkerServer]:
    server_config = ServerConfig(
        worker=config,
        tls_cert=pki.paths.server_cert,
        tls_key=pki.paths.server_key,
        client_ca=pki.paths.client_ca,
        port=0,
    )
    async with JobworkerServer(server_config) as running:
        yield running


@pytest.fixture
def connect(server: JobworkerServer, pki: Pki) -> Callable[[str], Client]:
    return lambda name: pki.client(server.port, name)


async def read_output(client: Client, job_id: str, offset: int = 0) -> bytes:
    out = bytearray()
    async with client.output(job_id, offset) as output:
        async for data in output:
            out += data
    return bytes(out)


async def test_admin_can_call_every_rpc(connect: Callable[[str], Client]) -> None:
    async with connect("admin") as admin:
        started = await admin.start("sh", ["-c", "echo hello; exec sleep 60"])
        assert started.state is JobState.RUNNING
        assert started.owner == "admin"
        assert (await admin.status(started.id)).pid == started.pid
        assert [j.id for j in await admin.list()] == [started.id]
        async with admin.output(started.id) as output:
            assert await output.__anext__() == b"hello\n"
        stopped = await admin.stop(started.id)
        assert stopped.state is JobState.STOPPED
        assert stopped.signal == signal.SIGTERM
        assert stopped.stopped_by == "admin", "the record says who stopped it"
        assert await read_output(admin, started.id) == b"hello\n"


async def test_a_user_runs_and_reads_own_jobs_but_may_not_stop_them(
    connect: Callable[[str], Client],
) -> None:
    async with connect("alice") as alice:
        job = await alice.start("sleep", ["60"])
        assert job.owner == "alice"
        with pytest.raises(PermissionDenied, match="StopJob"):
            await alice.stop(job.id)
        assert (await alice.status(job.id)).state is JobState.RUNNING, "the refused stop did it"
    async with connect("admin") as admin:
        assert (await admin.stop(job.id)).state is JobState.STOPPED


async def test_a_refused_call_is_audited_with_the_job_it_targeted(
    connect: Callable[[str], Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.audit")
    async with connect("alice") as alice:
        job = await alice.start("sleep", ["60"])
        with pytest.raises(PermissionDenied, match="role 'user' may not call StopJob"):
            await alice.stop(job.id)
        assert (await alice.status(job.id)).state is JobState.RUNNING, "the refused stop did it"
    lines = [r.getMessage() for r in caplog.records if r.name == "jobworker.audit"]
    refusal = f"audit who=alice role=user rpc=StopJob job={job.id} outcome=permission_denied "
    assert [line for line in lines if line.startswith(refusal)], lines


async def test_a_user_cannot_see_another_users_jobs(connect: Callable[[str], Client]) -> None:
    async with connect("alice") as alice, connect("bob") as bob, connect("admin") as admin:
        alices = await alice.start("echo", ["secret"])
        bobs = await bob.start("true")
        for call in (bob.status(alices.id), read_output(bob, alices.id)):
            with pytest.raises(JobNotFound) as seen:
                await call
            # Exactly what an unknown id gets: nothing tells that the job exists.
            with pytest.raises(JobNotFound) as unknown:
                await bob.status(UNKNOWN_ID)
            assert str(seen.value).replace(alices.id, UNKNOWN_ID) == str(unknown.value)
        assert [j.id for j in await bob.list()] == [bobs.id]
        assert [j.id for j in await alice.list()] == [alices.id]
        assert {j.id for j in await admin.list()} == {alices.id, bobs.id}
        assert await read_output(admin, alices.id) == b"secret\n"


async def test_a_user_named_like_an_admin_sees_nothing_of_the_admins(
    connect: Callable[[str], Client],
) -> None:
    async with connect("admin") as admin, connect("fake-admin") as impostor:
        admins = await admin.start("echo", ["secret"])
        own = await impostor.start("true")
        assert (admins.owner, admins.owner_role) == ("admin", "admin")
        assert (own.owner, own.owner_role) == ("admin", "user")
        with pytest.raises(JobNotFound):
            await impostor.status(admins.id)
        with pytest.raises(JobNotFound):
            await read_output(impostor, admins.id)
        assert [j.id for j in await impostor.list()] == [own.id]
        assert {j.id for j in await admin.list()} == {admins.id, own.id}


async def test_per_user_quotas_refuse_one_more_and_count_nothing_of_admins(
    config: WorkerConfig, pki: Pki
) -> None:
    limits = ServerLimits(max_running_jobs_per_user=2, max_streams_per_user=1)
    server_config = ServerConfig(
        worker=config,
        tls_cert=pki.paths.server_cert,
        tls_key=pki.paths.server_key,
        client_ca=pki.paths.client_ca,
        port=0,
        limits=limits,
    )
    async with (
        JobworkerServer(server_config) as server,
        pki.client(server.port, "alice") as alice,
        pki.client(server.port, "admin") as admin,
    ):
        jobs = [await alice.start("sleep", ["60"]) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="2 jobs running"):
            await alice.start("sleep", ["60"])
        assert len(await alice.list()) == 2, "the refused start left no job"
        for _ in range(3):
            await admin.start("true")  # admins are not counted
        held = alice.output(jobs[0].id)
        async with held:
            with pytest.raises(ResourceExhausted, match="1 output streams open"):
                await read_output(alice, jobs[1].id)
        await admin.stop(jobs[0].id)
        replacement = await alice.start("true")  # a slot came free
        assert replacement.owner == "alice"


@pytest.mark.parametrize(("name", "reason"), [("nobody", "no role"), ("weird", "unknown role")])
async def test_a_certificate_without_a_valid_role_may_do_nothing(
    connect: Callable[[str], Client], name: str, reason: str
) -> None:
    async with connect(name) as client:
        with pytest.raises(PermissionDenied, match=reason):
            await client.start("true")
        with pytest.raises(PermissionDenied, match=reason):
            await client.list()
    async with connect("admin") as admin:
        assert await admin.list() == [], "the refused start started nothing"


async def test_bad_requests_get_clear_errors_and_change_nothing(
    connect: Callable[[str], Client], server: JobworkerServer
) -> None:
    async with connect("admin") as admin:
        with pytest.raises(InvalidArgument, match="invalid job id"):
            await admin.status("../../etc/passwd")
        with pytest.raises(InvalidArgument, match="must not be empty"):
            await admin.start("")
        with pytest.raises(InvalidArgument, match="NUL"):
            await admin.start("echo", ["a\0b"])
        with pytest.raises(InvalidArgument, match="not found"):
            await admin.start("no-such-program-here")
        with pytest.raises(InvalidArgument, match="pids"):
            await admin.start("true", limits=Limits(pids=0))
        with pytest.raises(JobNotFound):
            await admin.stop(UNKNOWN_ID)
        with pytest.raises(InvalidArgument, match="invalid job id"):
            await read_output(admin, "nope")
        assert await admin.list() == []
    assert job_cgroups_of(server) == []


def job_cgroups_of(server: JobworkerServer) -> list[str]:
    jobs = server.config.worker.cgroup_root
    assert jobs is not None
    return sorted(p.name for p in (jobs / "jobs").iterdir() if p.is_dir())


async def test_a_limit_the_host_cannot_enforce_is_failed_precondition(
    connect: Callable[[str], Client], tests_cgroup: Path
) -> None:
    if "memory" in (tests_cgroup / "cgroup.subtree_control").read_text().split():
        pytest.skip("the memory controller is available here")
    async with connect("admin") as admin:
        with pytest.raises(FailedPrecondition, match="cannot enforce --memory:"):
            await admin.start("true", limits=Limits(memory_bytes=64 << 20))
        assert await admin.list() == []


async def test_a_removed_log_file_is_data_loss_and_tells_no_path(
    connect: Callable[[str], Client], config: WorkerConfig
) -> None:
    async with connect("admin") as admin:
        job = await admin.start("echo", ["hi"])
        await read_output(admin, job.id)
        (config.data_dir / "logs" / f"{job.id}.log").unlink()  # an operator removed the log
        with pytest.raises(DataLoss, match="no longer on the server") as caught:
            await read_output(admin, job.id)
        assert str(config.data_dir) not in str(caught.value)
        assert (await admin.status(job.id)).state is JobState.COMPLETED, "the job record stays"


async def test_several_clients_streaming_one_job_get_identical_bytes(
    connect: Callable[[str], Client],
) -> None:
    script = "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.002; done"
    async with connect("admin") as admin:
        job = await admin.start("sh", ["-c", script])
        results: list[bytes] = []

        async def reader(name: str) -> None:
            async with connect(name) as client:
                results.append(await read_output(client, job.id))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(reader, "admin")
        expected = "".join(f"line {i}\n" for i in range(300)).encode()
        assert results == [expected] * 4


async def test_output_resumes_from_an_offset(connect: Callable[[str], Client]) -> None:
    async with connect("admin") as admin:
        job = await admin.start("printf", ["0123456789"])
        assert await read_output(admin, job.id) == b"0123456789"
        assert await read_output(admin, job.id, 6) == b"6789"


async def test_a_client_that_disconnects_mid_stream_leaks_nothing(
    connect: Callable[[str], Client], server: JobworkerServer
) -> None:
    async with connect("admin") as admin:
        job = await admin.start("sh", ["-c", "echo first; exec sleep 60"])
        async with admin.output(job.id) as output:  # a warm-up, so lazily opened fds exist
            await output.__anext__()
        await anyio.sleep(0.1)
        fds = open_fds()
        watcher = server._service._worker._watcher  # type: ignore[union-attr]

        def watching() -> tuple[int, int]:  # kernel watches, and who they wake
            return watcher.watch_count, sum(len(w.waiters) for w in watcher._by_wd.values())

        before = watching()  # the job's log, watched to record when output is written
        for _ in range(3):
            client = connect("admin")
            await client.__aenter__()
            output = client.output(job.id)
            await output.__aenter__()
            assert await output.__anext__() == b"first\n"
            await client.aclose()  # the connection drops with the stream open
        with anyio.fail_after(5):
            while watching() != before or open_fds() != fds:
                await anyio.sleep(0.02)
        await admin.stop(job.id)


async def test_shutdown_ends_open_streams_with_unavailable_and_stops_jobs(
    config: WorkerConfig, pki: Pki, cgroup_root: Path
) -> None:
    server_config = ServerConfig(
        worker=config,
        tls_cert=pki.paths.server_cert,
        tls_key=pki.paths.server_key,
        client_ca=pki.paths.client_ca,
        port=0,
    )
    errors: list[Exception] = []
    streaming = anyio.Event()

    async def follow(client: Client, job_id: str) -> None:
        try:
            async with client.output(job_id, reconnect_for=0) as output:
                async for _ in output:
                    streaming.set()
        except JobworkerError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(config.stop_grace + 10):  # the whole shutdown is bounded
            async with JobworkerServer(server_config) as server:
                client = pki.client(server.port, "admin")
                await client.__aenter__()
                job = await client.start("sh", ["-c", "echo started; exec sleep 300"])
                tg.start_soon(follow, client, job.id)
                await streaming.wait()
            while not errors:  # the follower heard of the shutdown, not a hang
                await anyio.sleep(0.01)
        await client.aclose()
    assert len(errors) == 1
    assert isinstance(errors[0], Unavailable)
    assert "shutting down" in str(errors[0])
    assert not cgroup_root.exists(), "the job cgroups and the worker's cgroup are gone"
