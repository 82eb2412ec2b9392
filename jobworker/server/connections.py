"""Accepting connections with limits: handshake timeout, connection caps, HTTP/2 calm.

grpclib accepts through ``loop.create_server``: every connection is taken, its TLS
handshake may last 60 s, and an HTTP/2 client may open and reset streams without end.
:class:`ConnectionGuard` accepts on the listening socket itself and hands grpclib only the
connections within the limits of :class:`~jobworker.server.limits.ServerLimits`:

* a connection over ``max_connections`` in all, or ``max_connections_per_peer`` from one
  IP address, is closed at once, before any TLS work (logged, at most once a second);
* the TLS handshake must end within ``handshake_timeout`` seconds, or the socket is closed;
  no TLS state is allocated before the client sends its first bytes;
* out of descriptors (EMFILE, ENFILE) or buffers, accepting pauses briefly and resumes: the
  server never stops listening because of it;
* each connection announces ``max_concurrent_streams`` (SETTINGS_MAX_CONCURRENT_STREAMS);
* a client that resets more than ``max_resets`` streams within ``reset_window`` seconds
  (or ten times that over the connection's life) gets GOAWAY with ENHANCE_YOUR_CALM and is
  closed, and the reset streams' memory goes with the connection. Audited once.

It relies on three grpclib internals, checked by :func:`check_grpclib` at start-up (fail
closed: the server refuses to start): the server's ``_protocol_factory``, its ``_server``
slot, and the h2 connection inside each protocol's ``connection``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections import Counter, deque
from typing import Any, Final

import h2.connection
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from jobworker.auth.audit import audit, using_connection
from jobworker.errors import ConfigError
from jobworker.server.limits import ServerLimits

__all__ = ["ConnectionGuard", "check_grpclib"]

log = logging.getLogger(__name__)

_OUT_OF_RESOURCES: Final = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_PAUSE: Final = 0.25
_LOG_EVERY: Final = 1.0


def check_grpclib(server: Server) -> None:
    """Raise ConfigError unless grpclib still has what :class:`ConnectionGuard` needs."""
    factory = getattr(server, "_protocol_factory", None)
    if not callable(factory) or getattr(server, "_server", False) is not None:
        raise ConfigError(
            "this grpclib version is not supported: its server internals changed, so "
            "connections cannot be limited; install grpclib 0.4.x"
        )


def _h2_of(protocol: H2Protocol) -> h2.connection.H2Connection:
    h2_conn = getattr(getattr(protocol, "connection", None), "_connection", None)
    if not isinstance(h2_conn, h2.connection.H2Connection):
        raise ConfigError("grpclib's protocol no longer holds an h2 connection")
    return h2_conn


async def _readable(conn: socket.socket) -> None:
    """Wait until ``conn`` has bytes to read (or is closed by the client)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


class _RateLog:
    """Log a recurring warning at most once per interval, with how often it happened."""

    def __init__(self) -> None:
        self._last = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < _LOG_EVERY:
            self._suppressed += 1
            return
        extra = (
            f" (and {self._suppressed} more since the last such line)" if self._suppressed else ""
        )
        log.warning(message + extra, *args)
        self._last, self._suppressed = now, 0


class _Slot:
    """One accepted connection's place in the counts; released exactly once."""

    def __init__(self, guard: ConnectionGuard, peer: str, address: str) -> None:
        self.guard = guard
        self.peer = peer
        self.address = address
        self.transport: asyncio.BaseTransport | None = None
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.guard._release(self)


class _GuardedProtocol(asyncio.Protocol):
    """grpclib's HTTP/2 protocol for one connection, with a stream cap and a reset budget."""

    def __init__(self, inner: H2Protocol, slot: _Slot, limits: ServerLimits) -> None:
        self._inner = inner
        self._slot = slot
        self._limits = limits
        self._resets: deque[float] = deque()
        self._reset_total = 0
        self._seen_failed = 0
        self._closed_for_resets = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._slot.transport = transport
        self._inner.connection_made(transport)
        h2_conn = _h2_of(self._inner)
        if h2_conn.local_settings.max_concurrent_streams != self._limits.max_concurrent_streams:
            h2_conn.update_settings(
                {SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams}
            )
            self._inner.connection.flush()

    def data_received(self, data: bytes) -> None:
        if self._closed_for_resets:
            return
        self._inner.data_received(data)
        failed = self._inner.connection.streams_failed
        if failed != self._seen_failed:
            self._count_resets(failed - self._seen_failed)
            self._seen_failed = failed

    def _count_resets(self, count: int) -> None:
        now = time.monotonic()
        self._reset_total += count
        self._resets.extend([now] * min(count, self._limits.max_resets + 1))
        while self._resets and self._resets[0] < now - self._limits.reset_window:
            self._resets.popleft()
        if (
            len(self._resets) > self._limits.max_resets
            or self._reset_total > 10 * self._limits.max_resets
        ):
            self._calm_down()

    def _calm_down(self) -> None:
        """GOAWAY (ENHANCE_YOUR_CALM), then close: the streams go with the connection."""
        self._closed_for_resets = True
        h2_conn = _h2_of(self._inner)
        h2_conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        self._inner.connection.flush()
        self._slot.guard.reset_log.warning(
            "closed the connection from %s: %d streams reset (limit %d in %g s)",
            self._slot.address,
            self._reset_total,
            self._limits.max_resets,
            self._limits.reset_window,
        )
        with using_connection(self._slot.address, None):
            audit(
                None,
                "-",
                None,
                "resource_exhausted",
                detail=f"connection closed with GOAWAY after {self._reset_total} reset streams",
            )
        self._inner.processor.close("too many reset streams")

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._slot.release()


class ConnectionGuard:
    """Accepts connections for a grpclib ``Server`` within ``limits`` (see module docs).

    grpclib sees it as its listening server: ``Server.close()`` and ``wait_closed()`` work
    as usual. :meth:`close_connections` closes every connection, handshakes included.
    """

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        ssl_context: ssl.SSLContext | None,
        limits: ServerLimits,
    ) -> None:
        check_grpclib(server)
        self._server = server
        self._sock = sock
        self._ssl = ssl_context
        self._limits = limits
        self._slots: set[_Slot] = set()
        self._per_peer: Counter[str] = Counter()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.refuse_log = _RateLog()
        self.reset_log = _RateLog()
        self.accept_log = _RateLog()

    # What grpclib's Server calls on its listening server.

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        self._sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._accepting is not None:
            await asyncio.gather(self._accepting, return_exceptions=True)

    # Ours.

    def transports(self) -> list[asyncio.BaseTransport]:
        """The transports of the open connections whose handshake has completed."""
        return [slot.transport for slot in self._slots if slot.transport is not None]

    @property
    def connection_count(self) -> int:
        """Open connections, handshakes in progress included."""
        return len(self._slots)

    def start(self) -> None:
        """Begin accepting, and become ``server``'s listening server."""
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._server._server = self  # type: ignore[assignment]
        self._server._server_closed_fut = loop.create_future()
        self._accepting = loop.create_task(self._accept_loop())

    def close_connections(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        for slot in list(self._slots):
            if slot.transport is not None:
                slot.transport.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                if self._closed.is_set():
                    return
                if exc.errno in _OUT_OF_RESOURCES:
                    self.accept_log.warning(
                        "cannot accept connections: %s; pausing %g s", exc.strerror, _ACCEPT_PAUSE
                    )
                else:
                    self.accept_log.warning("accept failed: %s", exc)
                await asyncio.sleep(_ACCEPT_PAUSE)
                continue
            self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        peer = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        address = f"[{peer}]:{addr[1]}" if ":" in peer else f"{peer}:{addr[1]}"
        if len(self._slots) >= self._limits.max_connections:
            self.refuse_log.warning(
                "refused a connection from %s: %d connections open (max_connections)",
                address,
                len(self._slots),
            )
            conn.close()
            return
        if self._per_peer[peer] >= self._limits.max_connections_per_peer:
            self.refuse_log.warning(
                "refused a connection from %s: %d connections open from %s "
                "(max_connections_per_peer)",
                address,
                self._per_peer[peer],
                peer,
            )
            conn.close()
            return
        slot = _Slot(self, peer, address)
        self._slots.add(slot)
        self._per_peer[peer] += 1
        task = asyncio.get_running_loop().create_task(self._handshake(conn, slot))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            inner = self._server._protocol_factory()
            return _GuardedProtocol(inner, slot, self._limits)

        started = loop.time()
        try:
            # No TLS state (asyncio keeps a 256 KiB buffer per TLS connection) until the
            # client has sent its first bytes; the whole handshake shares one deadline.
            await asyncio.wait_for(_readable(conn), self._limits.handshake_timeout)
            remaining = self._limits.handshake_timeout - (loop.time() - started)
            if remaining <= 0:
                raise TimeoutError("the TLS handshake did not complete in time")
            await loop.connect_accepted_socket(
                protocol,
                sock=conn,
                ssl=self._ssl,
                ssl_handshake_timeout=remaining if self._ssl else None,
            )
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            # A refused or slow handshake: TLS says why (the server logs it at debug level).
            log.debug("handshake with %s failed: %r", slot.address, exc)
            conn.close()
            slot.release()
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _release(self, slot: _Slot) -> None:
        self._slots.discard(slot)
        self._per_peer[slot.peer] -= 1
        if self._per_peer[slot.peer] <= 0:
            del self._per_peer[slot.peer]
        # grpclib drops a closed connection's handler (and the cancelled tasks that hold its
        # streams) only every tenth new connection; drop it as soon as its tasks are done.
        asyncio.get_running_loop().call_later(0.5, self._server.__gc_collect__)
