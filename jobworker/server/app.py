"""The server's lifecycle: start, serve, and a graceful, bounded shutdown.

Shutdown (SIGTERM, SIGINT, or leaving :class:`JobworkerServer`) goes in this order (a
second SIGTERM or SIGINT meanwhile ends the process at once, leaving running jobs to the next
server):

1. new calls are refused and open calls, output streams included, end with UNAVAILABLE;
2. up to ``drain_timeout`` seconds for those answers to be sent;
3. the listening socket is closed and any call still running is cancelled;
4. every client connection is closed, handshakes in progress included (Python 3.12+
   would otherwise wait for clients to hang up before ``wait_closed`` returns);
5. the worker stops every running job (SIGTERM, its grace period, then ``cgroup.kill``)
   and removes their cgroups; with ``on_exit=KEEP`` it leaves them running instead, for the
   next server on the same data directory to adopt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.health.service import Health
from grpclib.server import Server

if TYPE_CHECKING:
    from grpclib._typing import IServable

from jobworker.auth import install_auth
from jobworker.errors import ConfigError
from jobworker.malloc import tune_malloc
from jobworker.server import capacity, lean
from jobworker.server.codec import ServerCodec
from jobworker.server.connections import ConnectionGuard
from jobworker.server.limits import ServerLimits
from jobworker.server.receive import install_receive_limits
from jobworker.server.service import WorkerService
from jobworker.server.signals import STOP_SIGNALS, held_stop_signal
from jobworker.server.tls import server_ssl_context
from jobworker.server.tuning import raise_open_file_limit, shrink_tls_read_buffers
from jobworker.worker import Worker, WorkerConfig
from jobworker.worker.config import OnExit
from jobworker.worker.reaper import set_child_subreaper

__all__ = ["JobworkerServer", "ServerConfig", "parse_listen", "serve"]

log = logging.getLogger(__name__)

# Larger HTTP/2 windows than the 64 KiB default let output chunks flow without waiting for
# a window update after every message.
_H2_WINDOW = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, which TLS files to use, and the worker's configuration."""

    worker: WorkerConfig
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    host: str = "127.0.0.1"
    port: int = 50051
    drain_timeout: float = 1.0
    limits: ServerLimits = field(default_factory=ServerLimits)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:50051`` for IPv6) as a (host, port) pair."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen address must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    # create_server leaves the protocol number 0, and accepted sockets inherit it; asyncio and
    # grpclib turn off Nagle's algorithm (TCP_NODELAY) only on sockets that say IPPROTO_TCP.
    # With Nagle on, the second of two small writes (a response's headers, then its first
    # message) waits for the client's delayed ACK: 40 ms.
    return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


class JobworkerServer:
    """A running server: ``async with JobworkerServer(config) as server: ...``."""

    def __init__(self, config: ServerConfig) -> None:
        config.limits.validate()
        self.config = config
        self._stack = AsyncExitStack()
        self._service: WorkerService | None = None
        self._server: Server | None = None
        self._guard: ConnectionGuard | None = None
        self.port = config.port

    async def __aenter__(self) -> JobworkerServer:
        async with AsyncExitStack() as stack:
            ssl_context = server_ssl_context(
                self.config.tls_cert, self.config.tls_key, self.config.client_ca
            )
            worker = await stack.enter_async_context(Worker(self.config.worker))
            # Listen only once the worker is ready: a connection that succeeds is served.
            sock = _listening_socket(self.config.host, self.config.port)
            stack.callback(sock.close)
            self._service = WorkerService(worker, self.config.limits)
            servables: list[IServable] = [self._service, Health()]
            self._server = Server(
                servables,
                codec=ServerCodec(),
                status_details_codec=ProtoStatusDetailsCodec(),
                config=Configuration(
                    http2_connection_window_size=_H2_WINDOW,
                    http2_stream_window_size=_H2_WINDOW,
                ),
            )
            install_auth(self._server)
            install_receive_limits(
                self._server,
                {
                    path: not handler.cardinality.client_streaming
                    for servable in servables
                    for path, handler in servable.__mapping__().items()
                },
                self.config.limits.max_message_size,
            )
            self._guard = ConnectionGuard(self._server, sock, ssl_context, self.config.limits)
            self._guard.start()
            stack.push_async_callback(self._close_server)
            self.port = sock.getsockname()[1]
            log.info("serving on %s:%d", self.config.host, self.port)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    @property
    def connections(self) -> ConnectionGuard:
        """The accepted connections and their limits."""
        assert self._guard is not None, "the server is not running"
        return self._guard

    async def _close_server(self) -> None:
        with anyio.CancelScope(shield=True):  # runs to the end even if its caller is cancelled
            await self._shutdown_calls()

    async def _shutdown_calls(self) -> None:
        assert self._service is not None
        assert self._server is not None
        log.info("shutting down: ending open calls")
        self._service.close()
        with anyio.move_on_after(self.config.drain_timeout):
            await self._service.wait_idle()
        self._server.close()
        assert self._guard is not None
        self._guard.close_connections()
        with anyio.move_on_after(self.config.drain_timeout):
            await self._server.wait_closed()
        log.info("connections closed; stopping jobs")


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully.

    The process is the server: it becomes a child subreaper and its worker reaps the orphans
    that jobs leave behind (``worker/reaper.py``), so it behaves the same as PID 1 of a
    container and as a service. A stop signal held since the process started
    (``server/signals.py``) ends it before it serves.
    """
    set_child_subreaper()
    raise_open_file_limit()
    capacity.check()
    tune_malloc()
    shrink_tls_read_buffers()
    lean.install()
    config = replace(config, worker=replace(config.worker, reap_orphans=True))
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if (held := held_stop_signal()) is not None:
            log.info("received %s while starting: not serving", held.name)
            return
        if os.getpid() == 1:
            log.info("running as PID 1: reaping orphaned processes")
            if config.worker.on_exit is OnExit.KEEP:
                log.warning(
                    "on-exit keep cannot keep jobs here: when PID 1 exits, the kernel ends "
                    "every process of its PID namespace (docs/deploy.md)"
                )
        # The shutdown listens for a second signal. A plain task, not a task group: a start-up
        # error must reach the caller as itself, not inside an exception group.
        second: asyncio.Task[None] | None = None
        try:
            async with JobworkerServer(config):
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    break
                second = asyncio.ensure_future(_exit_on_second_signal(signals))
        finally:
            if second is not None:
                second.cancel()


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    """A second SIGTERM or SIGINT during the shutdown ends the process at once: the jobs
    still running are left to the next server on this data directory, which adopts them."""
    async for signum in signals:
        log.warning(
            "received %s again: exiting now; running jobs are left to the next server",
            signal.Signals(signum).name,
        )
        logging.shutdown()
        os._exit(1)
