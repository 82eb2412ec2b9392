"""The server's sockets: small writes go out at once (TCP_NODELAY); enough descriptors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from jobworker.certs import init_pki
from jobworker.client import Client
from jobworker.server.app import JobworkerServer, ServerConfig, _listening_socket
from jobworker.worker import WorkerConfig

pytestmark = pytest.mark.anyio


def test_the_listening_socket_says_tcp() -> None:
    with _listening_socket("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP  # what asyncio checks before TCP_NODELAY


async def test_accepted_connections_have_nagle_off(tmp_path: Path, cgroup_root: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    config = ServerConfig(
        worker=WorkerConfig(data_dir=tmp_path / "data", cgroup_root=cgroup_root),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.client_ca,
        port=0,
    )
    async with JobworkerServer(config) as server:
        client = Client(
            "127.0.0.1", server.port, cert=pki.admin_cert, key=pki.admin_key, ca=pki.server_ca
        )
        async with client:
            await client.list()
            connections = server.connections.transports()
            assert connections
            for transport in connections:
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_serve_raises_the_soft_open_file_limit_to_the_hard_one() -> None:
    import resource

    from jobworker.server.tuning import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"needs a finite hard limit above 1024, not {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_tune_malloc_applies_unless_the_administrator_tuned_it() -> None:
    import os
    import subprocess
    import sys

    def tune_malloc_in_a_child(env: dict[str, str]) -> str:
        code = "from jobworker.malloc import tune_malloc; print(tune_malloc())"
        child = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return child.stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and "MALLOC_" not in k}
    assert tune_malloc_in_a_child(env) == "True"
    env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=1048576"
    assert tune_malloc_in_a_child(env) == "False"


def test_a_tls_connection_costs_the_server_no_256_kib_read_buffer(
    tmp_path: Path, cgroup_root: Path
) -> None:
    import ssl
    import time

    from helpers import serving

    def rss_kib(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))

    with serving(tmp_path, cgroup_root) as server:
        context = ssl.create_default_context(cafile=server.env["JOBWORKER_CA"])
        context.load_cert_chain(server.env["JOBWORKER_CERT"], server.env["JOBWORKER_KEY"])
        context.set_alpn_protocols(["h2"])
        connections: list[ssl.SSLSocket] = []

        def connect(count: int) -> None:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.port))
                connections.append(context.wrap_socket(sock, server_hostname="localhost"))
            time.sleep(0.5)  # the server's side of each handshake is done

        try:
            connect(10)  # the first connections also warm up what every one shares
            before = rss_kib(server.process.pid)
            connect(60)
            per_connection = (rss_kib(server.process.pid) - before) / 60
        finally:
            for connection in connections:
                connection.close()
    # asyncio's own read buffer alone would be 256 KiB (measured: about 300 KiB with it,
    # 80 KiB without).
    assert per_connection < 160, f"each TLS connection costs the server {per_connection} KiB"


def test_serve_leaves_pydantic_unloaded(tmp_path: Path, cgroup_root: Path) -> None:
    from helpers import serving

    with serving(tmp_path, cgroup_root) as server:
        server.start("true")  # one call of each kind the messages serve
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "jobworker" in maps or "python" in maps  # the map of a live server was read
    assert "pydantic_core" not in maps, "serve loaded pydantic (about 3 MB) for nothing"
