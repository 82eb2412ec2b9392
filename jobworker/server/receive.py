"""Receiving request messages with a size limit and strict checks.

grpclib reads a message by trusting its 5-byte prefix: it buffers as many bytes as the
length field says (up to 4 GiB), raises ``NotImplementedError`` for the compressed flag, an
``AssertionError`` for a prefix or body cut short, and lets a decode error escape. Each of
these reaches the caller as ``UNKNOWN`` with a traceback in the log.

:func:`install_receive_limits` registers a ``RecvRequest`` listener (after the auth hook, so
only authorized calls get here) that gives every call's stream a receiver of its own,
:class:`BoundedReceiver`, which:

* reads the 5-byte prefix and refuses a length above ``max_message_size`` with
  RESOURCE_EXHAUSTED **before** reading the body (the unread body is never acknowledged,
  so HTTP/2 flow control stops the sender, and the stream is reset when the call ends);
* refuses the compressed flag (the server announces no compression), a prefix or body cut
  short, a unary call that carries no message, and bytes that are not a well-formed
  message of the expected type (:mod:`jobworker.server.wire`) with INVALID_ARGUMENT;
* writes one audit line for each refusal.

It needs three attributes of grpclib's server ``Stream`` that are not public API (its HTTP/2
stream, its codec and its request type). :func:`check_grpclib` verifies at start-up that
they exist; if a call's stream lacks them anyway, the call is refused with INTERNAL rather
than read without a limit (fail closed).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import betterproto2
import grpclib.protocol
import grpclib.server
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from jobworker.auth.audit import audit
from jobworker.auth.hook import current_caller, rpc_name
from jobworker.errors import ConfigError, InvalidMessage, JobworkerError, ResourceExhausted
from jobworker.server.wire import check_wire

if TYPE_CHECKING:
    from grpclib._typing import IServerMethodFunc

__all__ = [
    "BoundedReceiver",
    "check_grpclib",
    "install_receive_limits",
]

log = logging.getLogger(__name__)

_PREFIX: Final = 5


class _H2Stream(Protocol):
    async def recv_data(self, size: int) -> bytes: ...


class _Codec(Protocol):
    def decode(self, data: bytes, message_type: Any) -> Any: ...


def check_grpclib() -> None:
    """Raise ConfigError unless grpclib still has what :class:`BoundedReceiver` relies on."""
    init = inspect.signature(grpclib.server.Stream.__init__).parameters
    recv_data = getattr(grpclib.protocol.Stream, "recv_data", None)
    if not {"stream", "recv_type", "codec"} <= set(init) or recv_data is None:
        raise ConfigError(
            "this grpclib version is not supported: its server stream has changed, so "
            "request sizes cannot be limited; install grpclib 0.4.x"
        )


class BoundedReceiver:
    """``recv_message`` for one call: the limits above, then grpclib's codec."""

    def __init__(
        self, stream: grpclib.server.Stream[Any, Any], max_message_size: int, unary: bool
    ) -> None:
        h2_stream = getattr(stream, "_stream", None)
        codec = getattr(stream, "_codec", None)
        recv_type = getattr(stream, "_recv_type", None)
        if h2_stream is None or codec is None or not isinstance(recv_type, type):
            log.error("grpclib's server stream has changed; refusing the call")
            raise GRPCError(Status.INTERNAL, "the server cannot read requests safely")
        self._h2: _H2Stream = h2_stream
        self._codec: _Codec = codec
        self._type: type = recv_type
        self._max = max_message_size
        self._unary = unary
        self._received = 0

    async def recv_message(self) -> Any:
        """The next request message, or None when the client has sent its last one."""
        prefix = await self._read(_PREFIX, "its 5-byte message prefix")
        if not prefix:
            if self._unary and not self._received:
                raise InvalidMessage("the call carried no request message")
            return None
        if prefix[0] == 1:
            raise InvalidMessage(
                "the message is marked compressed, but this server accepts no compression"
            )
        if prefix[0] != 0:
            raise InvalidMessage(f"the message prefix has an invalid flag byte {prefix[0]}")
        size = int.from_bytes(prefix[1:], "big")
        if size > self._max:
            raise ResourceExhausted(
                f"the request message is {size} bytes; this server accepts at most "
                f"{self._max} bytes"
            )
        body = await self._read(size, f"the {size} bytes its prefix announced")
        if issubclass(self._type, betterproto2.Message):
            check_wire(body, self._type)
        try:
            message = self._codec.decode(body, self._type)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the bytes are bad
            raise InvalidMessage(
                f"the request is not a valid {self._type.__name__}: {type(exc).__name__}"
            ) from None
        self._received += 1
        return message

    async def _read(self, size: int, what: str) -> bytes:
        try:
            return await self._h2.recv_data(size)
        except AssertionError:  # grpclib's buffer: the stream ended before `size` bytes
            raise InvalidMessage(f"the request ended before {what}") from None


def _guard(
    func: IServerMethodFunc, path: str, max_message_size: int, unary: bool
) -> IServerMethodFunc:
    async def guarded(stream: grpclib.server.Stream[Any, Any]) -> None:
        receiver = BoundedReceiver(stream, max_message_size, unary)
        stream.recv_message = receiver.recv_message  # type: ignore[method-assign]
        try:
            await func(stream)
        except (InvalidMessage, ResourceExhausted) as exc:
            # Raised while reading the request, before the service saw it: audited here.
            _refused(path, exc)
            raise GRPCError(exc.grpc_status, exc.message) from None

    return guarded


def _refused(path: str, exc: JobworkerError) -> None:
    if exc.grpc_status is Status.RESOURCE_EXHAUSTED:
        log.warning("refused a request on %s: %s", path, exc.message)
    audit(current_caller(), rpc_name(path), None, exc.grpc_status, detail=exc.message)


def install_receive_limits(
    server: Server, unary_requests: Mapping[str, bool], max_message_size: int
) -> None:
    """Read every request of ``server`` through a :class:`BoundedReceiver`.

    ``unary_requests`` maps each served path to whether its request is a single message.
    Register this after the auth hook, so that only authorized calls are read at all.
    """
    check_grpclib()

    async def on_request(event: RecvRequest) -> None:
        unary = unary_requests.get(event.method_name, False)
        event.method_func = _guard(event.method_func, event.method_name, max_message_size, unary)

    listen(server, RecvRequest, on_request)
