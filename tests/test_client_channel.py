"""The client's connections accept large HTTP/2 frames, and large chunks arrive intact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import JOB_PYTHON

from jobworker.certs import PkiPaths, init_pki
from jobworker.client import Client
from jobworker.client.channel import MAX_FRAME_SIZE
from jobworker.server.app import JobworkerServer, ServerConfig
from jobworker.worker import WorkerConfig

pytestmark = pytest.mark.anyio

WRITE_3_MIB = "import os\nfor i in range(48): os.write(1, bytes([i]) * 65536)"


@pytest.fixture
async def served(tmp_path: Path, cgroup_root: Path) -> AsyncIterator[tuple[int, PkiPaths]]:
    pki = init_pki(tmp_path / "pki")
    worker = WorkerConfig(
        data_dir=tmp_path / "data",
        cgroup_root=cgroup_root,
        stop_grace=2.0,
        chunk_size=512 * 1024,
    )
    config = ServerConfig(
        worker=worker,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.client_ca,
        port=0,
    )
    async with JobworkerServer(config) as server:
        yield server.port, pki


async def test_large_chunks_arrive_whole_in_order(served: tuple[int, PkiPaths]) -> None:
    port, pki = served
    client = Client("127.0.0.1", port, cert=pki.admin_cert, key=pki.admin_key, ca=pki.server_ca)
    async with client:
        job = await client.start(JOB_PYTHON, ["-c", WRITE_3_MIB])
        received = bytearray()
        sizes = []
        async with client.output(job.id) as output:
            while (chunk := await output.next_chunk()) is not None:
                assert chunk.offset == len(received)
                received += chunk.data
                sizes.append(len(chunk.data))
        assert bytes(received) == b"".join(bytes([i]) * 65536 for i in range(48))
        assert max(sizes) > 16 * 1024
        # The server acknowledged the client's setting: it may send frames this large.
        channel = client.stub.channel
        h2 = channel._protocol.connection._connection  # type: ignore[union-attr]
        assert h2.local_settings.max_frame_size == MAX_FRAME_SIZE


@pytest.mark.parametrize("size", [0, 1, 10, 11, 100_000])
def test_data_frame_repr_is_hyperframes_without_the_full_hexdump(size: int) -> None:
    from hyperframe.frame import DataFrame, _raw_data_repr

    from jobworker.client.channel import _data_frame_body_repr

    frame = DataFrame(1, bytes(range(256)) * (size // 256) + bytes(range(size % 256)))
    assert _data_frame_body_repr(frame) == _raw_data_repr(frame.serialize_body())


async def test_leaving_a_stream_the_server_already_failed_raises_its_error(
    served: tuple[int, PkiPaths],
) -> None:
    """Not h2's StreamClosedError, nor grpclib's GRPCError: the library's own exception."""
    import anyio

    from jobworker.errors import JobNotFound

    port, pki = served
    client = Client("127.0.0.1", port, cert=pki.admin_cert, key=pki.admin_key, ca=pki.server_ca)

    async def leave_unread(body_error: Exception | None) -> None:
        async with client.output("3f2b8c1e-7d4a-4e6b-9c2d-1a5f0e9b7c34"):
            await anyio.sleep(0.3)  # the server's NOT_FOUND arrives; nobody reads it
            if body_error is not None:
                raise body_error

    async with client:
        with pytest.raises(JobNotFound):
            await leave_unread(None)
        with pytest.raises(KeyError):  # the body's own error wins
            await leave_unread(KeyError("body"))
        assert await client.list() == []  # the connection is still fine
