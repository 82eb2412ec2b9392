"""Hostile connections: never-finished handshakes, floods from one peer, rapid reset, EMFILE."""

from __future__ import annotations

import resource
import socket
import time

import anyio
import anyio.lowlevel
import pytest
from conftest import FD_MARGIN, FULL, RSS_MARGIN, AbusePki, audit_lines, served, usage
from h2.errors import ErrorCodes
from h2raw import RawH2

from jobworker.server.app import JobworkerServer
from jobworker.server.limits import ServerLimits

pytestmark = [pytest.mark.abuse, pytest.mark.anyio]

HEALTH = "/grpc.health.v1.Health/Check"


@pytest.fixture
def limits() -> ServerLimits:
    return ServerLimits(
        handshake_timeout=0.5,
        max_connections=400,
        max_connections_per_peer=300,
        max_resets=50,
        reset_window=10.0,
    )


def plain_connections(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never start TLS."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


async def test_connections_that_never_start_tls_are_closed_after_the_handshake_timeout(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    count = 2000 if FULL else 200
    await served(abuse_pki, server.port)
    before = usage()
    socks: list[socket.socket] = []
    try:
        for _ in range(count // 100):  # in waves: the listen backlog is finite
            socks += plain_connections(server.port, 100)
            await anyio.sleep(0.05)
        await served(abuse_pki, server.port)  # served while they wait
        held = usage()
        deadline = time.monotonic() + 10
        while not all(closed_by_server(s) for s in socks):
            assert time.monotonic() < deadline, "pre-handshake connections were left open"
            await anyio.sleep(0.1)
        assert server.connections.connection_count <= 1, "their slots were released"
    finally:
        for sock in socks:
            sock.close()
    await served(abuse_pki, server.port)
    after = usage()
    # While held, each costs a socket, not a TLS connection's buffers (~256 KiB each).
    assert held.rss - before.rss < 50 << 20
    assert after.rss - before.rss < RSS_MARGIN
    assert after.fds - before.fds <= FD_MARGIN


@pytest.mark.parametrize("limits", [ServerLimits(max_connections_per_peer=5)])
async def test_connections_over_the_per_peer_cap_are_closed_at_once(
    server: JobworkerServer, abuse_pki: AbusePki, caplog: pytest.LogCaptureFixture
) -> None:
    held = plain_connections(server.port, 5)
    extra = plain_connections(server.port, 3)
    try:
        with anyio.fail_after(5):
            while not all(closed_by_server(s) for s in extra):
                await anyio.sleep(0.02)
        assert not any(closed_by_server(s) for s in held), "the first five are still open"
        assert any("max_connections_per_peer" in r.getMessage() for r in caplog.records)
    finally:
        for sock in held + extra:
            sock.close()
    with anyio.fail_after(5):
        while server.connections.connection_count:
            await anyio.sleep(0.02)
    await served(abuse_pki, server.port)  # the cap is per open connection, not a ban


async def test_the_server_announces_its_stream_cap(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    raw = await RawH2.open(server.port, abuse_pki.context())
    try:
        assert (await raw.call(HEALTH, b"\x00\x00\x00\x00\x00")).status == 0
        assert raw.conn.remote_settings.max_concurrent_streams == 100
    finally:
        await raw.aclose()


async def test_rapid_reset_gets_goaway_enhance_your_calm_and_others_are_served(
    server: JobworkerServer, abuse_pki: AbusePki, audit_log: pytest.LogCaptureFixture
) -> None:
    await served(abuse_pki, server.port)
    before = usage()
    connections = 20 if FULL else 3
    for _ in range(connections):
        raw = await RawH2.open(server.port, abuse_pki.context())
        try:
            with anyio.fail_after(10):
                sent = 0
                while not raw.closed and sent < 10_000:  # bounded: the server must act first
                    stream_id = await raw.start(HEALTH)
                    await raw.reset(stream_id)
                    sent += 1
                    if sent % 20 == 0:
                        with anyio.move_on_after(0.01):
                            await raw.receive_once(1)
                while not raw.closed:
                    await raw.receive_once(5)
        finally:
            await raw.aclose()
        assert raw.goaway == ErrorCodes.ENHANCE_YOUR_CALM
        assert sent < 1_000, f"the server let {sent} resets through"
        await served(abuse_pki, server.port)
    lines = [line for line in audit_lines(audit_log) if "reset streams" in line]
    assert len(lines) == connections
    assert all(
        "outcome=resource_exhausted" in line and " peer=127.0.0.1:" in line for line in lines
    )
    with anyio.fail_after(5):
        while server.connections.connection_count:
            await anyio.sleep(0.05)
    await anyio.sleep(0.6)  # the handlers of closed connections are dropped after 0.5 s
    after = usage()
    assert after.rss - before.rss < RSS_MARGIN
    assert after.fds - before.fds <= FD_MARGIN


async def test_out_of_descriptors_the_server_keeps_listening_and_serves_again(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    await served(abuse_pki, server.port)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    socks: list[socket.socket] = []
    try:
        # Leave room for a few dozen descriptors, then use them all up with connections.
        in_use = usage().fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))
        with anyio.fail_after(10):
            while len(socks) < 60:
                try:
                    socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=1))
                except OSError:
                    break
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.5)  # the server now meets EMFILE when it accepts
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with anyio.fail_after(10):
        await served(abuse_pki, server.port)


async def test_rapid_reset_for_seconds_leaves_memory_bounded_and_health_answered(
    server: JobworkerServer, abuse_pki: AbusePki
) -> None:
    """Attackers that reconnect and reset for 2 s (10 s in full mode), while a normal client
    checks health on its own connection: every check is answered and memory stays bounded.
    The latency of the checks is printed (the abuse table in docs/security.md)."""
    seconds = 10.0 if FULL else 2.0
    before = usage()
    latencies: list[float] = []
    attacks = 0

    async def attacker() -> None:
        nonlocal attacks
        while True:
            raw = await RawH2.open(server.port, abuse_pki.context())
            try:
                while not raw.closed:
                    await raw.reset(await raw.start(HEALTH))
                    attacks += 1
                    if attacks % 20 == 0:
                        with anyio.move_on_after(0.01):
                            await raw.receive_once(1)
            finally:
                await raw.aclose()

    async def checker() -> None:
        async with abuse_pki.client(server.port) as client:
            while True:
                began = time.perf_counter()
                assert isinstance(await client.list(), list)
                latencies.append(time.perf_counter() - began)
                await anyio.sleep(0.01)

    with anyio.move_on_after(seconds), anyio.fail_after(seconds + 30):
        async with anyio.create_task_group() as group:
            group.start_soon(attacker)
            group.start_soon(checker)
    await anyio.sleep(0.6)  # the handlers of closed connections are dropped after 0.5 s
    after = usage()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"\nrapid reset {seconds:g} s: {attacks} resets, {len(latencies)} checks, "
        f"p99 {p99:.1f} ms, RSS {before.rss >> 20} -> {after.rss >> 20} MiB"
    )
    assert len(latencies) > 10, "the normal client was served throughout"
    assert after.rss - before.rss < RSS_MARGIN
