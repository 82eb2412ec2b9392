"""The server's authorization hook: identity and policy applied before any handler runs.

:func:`install_auth` registers a grpclib ``RecvRequest`` listener. For every call it

1. reads the peer's DER certificate from the TLS connection (:func:`peer_certificate_der`),
2. builds the caller's :class:`~jobworker.auth.identity.Identity`,
3. checks that the call's path is one the policy knows
   (:func:`~jobworker.auth.policy.check_path`); whether the caller's role allows it is
   decided by the service once the request is read, so the audit line names its job,
4. stores the identity in a context variable that the handler reads with
   :func:`current_identity` (the hook runs in the handler's own task).

A refusal raises ``GRPCError(UNAUTHENTICATED or PERMISSION_DENIED, reason)``, so grpclib
answers the call without running the handler, and logs one audit line. Every audit line
of the call names the client's address and its certificate's serial number.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.protocol import Peer
from grpclib.server import Server

from jobworker.auth.audit import audit, set_connection
from jobworker.auth.identity import Identity, common_name, identity_from_der, load_peer_certificate
from jobworker.auth.policy import WORKER_SERVICE, check_path, split_path
from jobworker.errors import PermissionDenied, Unauthenticated

__all__ = [
    "current_caller",
    "current_identity",
    "install_auth",
    "peer_address",
    "peer_certificate_der",
    "peer_transport",
    "rpc_name",
    "use_identity",
]

_current: ContextVar[Identity | None] = ContextVar("jobworker_identity", default=None)


class HasPeer(Protocol):
    """Anything that knows its connection's peer: a server stream or a RecvRequest event."""

    @property
    def peer(self) -> Peer: ...


def peer_transport(stream: HasPeer) -> asyncio.BaseTransport | None:
    """The transport of the connection a call arrived on, or None if it cannot be found.

    grpclib's :class:`~grpclib.protocol.Peer` keeps it in the private ``_transport``
    attribute; this is the only place that touches grpclib internals. If they change, it
    returns None: certificates then cannot be read and callers are refused (fail closed).
    """
    transport = getattr(stream.peer, "_transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


def peer_certificate_der(stream: HasPeer) -> bytes | None:
    """The DER certificate the TLS peer presented, or None when there is none.

    grpclib's :class:`~grpclib.protocol.Peer` exposes only ``getpeercert()``'s dict, which
    lacks extensions, so this reads the TLS object of the connection's transport.
    """
    transport = peer_transport(stream)
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    return ssl_object.getpeercert(binary_form=True)


def peer_address(stream: HasPeer) -> str | None:
    """The client's ``host:port`` (``[host]:port`` for IPv6), or None if unknown."""
    try:
        addr = stream.peer.addr()
    except (AttributeError, OSError):
        return None
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host, port = str(addr[0]), addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=1024)
def _serial(der: bytes) -> str | None:
    """The client certificate's serial number in hex (upper case, as OpenSSL shows it)."""
    try:
        return f"{load_peer_certificate(der).serial_number:X}"
    except Unauthenticated:
        return None


# A connection's certificate is the same for every call on it: parse it once. Only good
# identities are cached (an exception is never cached), keyed by the exact DER bytes.
_identity = functools.lru_cache(maxsize=1024)(identity_from_der)


def rpc_name(path: str) -> str:
    """How audit lines name a call: the Worker method, or the full path of anything else."""
    service, method = split_path(path)
    return method if service == WORKER_SERVICE else path


def current_caller() -> Identity | None:
    """The identity of the caller whose handler is running, if the hook established one."""
    return _current.get()


def current_identity() -> Identity:
    """The identity of the caller whose handler is running, or raise Unauthenticated."""
    identity = _current.get()
    if identity is None:
        raise Unauthenticated("no authenticated caller in this context")
    return identity


@contextmanager
def use_identity(identity: Identity) -> Iterator[Identity]:
    """Make ``identity`` the current caller inside the ``with`` block (for in-process use)."""
    token = _current.set(identity)
    try:
        yield identity
    finally:
        _current.reset(token)


def _who(der: bytes | None) -> str | None:
    """Best-effort name for an audit line about a caller that was refused."""
    try:
        return common_name(load_peer_certificate(der))
    except Unauthenticated:
        return None


async def _on_request(event: RecvRequest) -> None:
    path = event.method_name
    rpc = rpc_name(path)
    der = peer_certificate_der(event)
    set_connection(peer_address(event), _serial(der) if der else None)
    identity: Identity | None = None
    try:
        if der is None:
            raise Unauthenticated("no client certificate was presented")
        identity = _identity(der)
        check_path(path)
    except (Unauthenticated, PermissionDenied) as exc:
        who = identity if identity is not None else _who(der)
        audit(who, rpc, None, exc.grpc_status, detail=exc.message)
        raise GRPCError(exc.grpc_status, exc.message) from None
    _current.set(identity)


def install_auth(server: Server) -> None:
    """Authenticate and authorize every call ``server`` receives, before its handler runs."""
    listen(server, RecvRequest, _on_request)
