"""Test helpers: a PKI with good and bad client certificates, and a TLS server to call.

Everything is generated at run time; no key material lives in the repository.

* :func:`build_pki` writes a full PKI (``init_pki``) plus one client certificate per case
  the server must accept or refuse, and returns a :class:`PkiFixture`.
* :func:`running_server` runs a real grpclib ``Server`` on 127.0.0.1 with the auth hook
  installed, serving the grpc.health.v1 service and a stand-in for ``jobworker.v1.Worker``
  whose handlers record the identity they see.
* :func:`call` makes one unary call over a fresh channel.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler
from grpclib.health.service import Health
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Server, Stream

from jobworker.auth import Identity, current_identity, install_auth, peer_certificate_der
from jobworker.auth.policy import Rpc
from jobworker.auth.roles import ROLE_OID, Role, encode_utf8string
from jobworker.certs import (
    CertAndKey,
    ClientPaths,
    PkiPaths,
    create_ca,
    create_client_cert,
    init_pki,
    load_cert_and_key,
)
from jobworker.client.tls import client_ssl_context
from jobworker.server.tls import server_ssl_context

HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: Client certificates the server must accept, by file name, with the role they carry.
GOOD_CLIENTS: Mapping[str, Role] = {"admin": Role.ADMIN, "alice": Role.USER}

#: Client certificates the server must refuse, by file name.
BAD_CLIENTS = (
    "rogue",  # role admin, but signed by a CA the server does not trust
    "expired",  # role admin, validity ended yesterday
    "serveronly",  # role admin, signed by the client CA, EKU serverAuth only
    "norole",  # no role extension
    "badrole",  # role extension holding "root"
    "server",  # the server's own certificate (server CA, serverAuth)
)


@dataclass(frozen=True)
class PkiFixture:
    """A PKI directory and the in-memory CAs behind it."""

    paths: PkiPaths
    server_ca: CertAndKey
    client_ca: CertAndKey
    clients: dict[str, ClientPaths] = field(default_factory=dict)

    def server_context(self) -> ssl.SSLContext:
        """The server's TLS context, exactly as the server builds it."""
        return server_ssl_context(
            self.paths.server_cert, self.paths.server_key, self.paths.client_ca
        )

    def client_context(self, name: str) -> ssl.SSLContext:
        """The client's TLS context for the client certificate ``name``."""
        client = self.clients[name]
        return client_ssl_context(client.cert, client.key, self.paths.server_ca)


def write_client(directory: Path, name: str, pair: CertAndKey) -> ClientPaths:
    """Write ``pair`` as ``NAME.pem`` and ``NAME-key.pem`` (tests only; no mode care)."""
    paths = ClientPaths(cert=directory / f"{name}.pem", key=directory / f"{name}-key.pem")
    paths.cert.write_bytes(pair.cert_pem())
    paths.key.write_bytes(pair.key_pem())
    return paths


def build_pki(directory: Path) -> PkiFixture:
    """Write a PKI into ``directory`` with the clients in GOOD_CLIENTS and BAD_CLIENTS."""
    paths = init_pki(directory)
    server_ca = load_cert_and_key(paths.server_ca, paths.server_ca_key)
    client_ca = load_cert_and_key(paths.client_ca, paths.client_ca_key)
    now = datetime.now(UTC)
    other_ca = create_ca("jobworker client CA")  # same name, different key
    made = {
        "alice": create_client_cert(client_ca, "alice", Role.USER),
        "rogue": create_client_cert(other_ca, "rogue", Role.ADMIN),
        "expired": create_client_cert(
            client_ca,
            "expired",
            Role.ADMIN,
            not_before=now - timedelta(days=10),
            not_after=now - timedelta(days=1),
        ),
        "serveronly": create_client_cert(
            client_ca,
            "serveronly",
            Role.ADMIN,
            extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
        ),
        "norole": create_client_cert(client_ca, "norole", None),
        "badrole": create_client_cert(
            client_ca,
            "badrole",
            None,
            extra_extensions=(x509.UnrecognizedExtension(ROLE_OID, encode_utf8string("root")),),
        ),
    }
    clients = {name: write_client(directory, name, pair) for name, pair in made.items()}
    clients["admin"] = ClientPaths(cert=paths.admin_cert, key=paths.admin_key)
    clients["server"] = ClientPaths(cert=paths.server_cert, key=paths.server_key)
    return PkiFixture(paths=paths, server_ca=server_ca, client_ca=client_ca, clients=clients)


@dataclass(frozen=True)
class WorkerCall:
    """One call that reached a FakeWorker handler."""

    rpc: str
    identity: Identity
    peer_der: bytes | None


class FakeWorker:
    """A stand-in for ``jobworker.v1.Worker``: each method answers SERVING and records
    which identity its handler saw (and the peer's DER certificate, read from the stream),
    so tests can tell whether a handler ran at all and for whom."""

    def __init__(self) -> None:
        self.calls: list[WorkerCall] = []

    def _handler(self, rpc: str) -> Handler:
        async def handle(stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
            await stream.recv_message()
            self.calls.append(WorkerCall(rpc, current_identity(), peer_certificate_der(stream)))
            await stream.send_message(HealthCheckResponse(status=HealthCheckResponse.SERVING))

        return Handler(handle, Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse)

    def __mapping__(self) -> dict[str, Handler]:
        return {f"/jobworker.v1.Worker/{rpc.value}": self._handler(rpc.value) for rpc in Rpc}


@dataclass
class RunningServer:
    """A server started by :func:`running_server`."""

    port: int
    worker: FakeWorker


@asynccontextmanager
async def running_server(context: ssl.SSLContext | None) -> AsyncIterator[RunningServer]:
    """Serve Health and FakeWorker on 127.0.0.1 (TLS unless ``context`` is None)."""
    worker = FakeWorker()
    server = Server([Health(), worker])
    install_auth(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    await server.start(sock=sock, ssl=context)
    try:
        yield RunningServer(port=port, worker=worker)
    finally:
        server.close()
        with anyio.fail_after(5):
            await server.wait_closed()


async def call(
    port: int, context: ssl.SSLContext | None, path: str = HEALTH_CHECK
) -> HealthCheckResponse:
    """One unary call to ``path`` with an empty HealthCheckRequest over a fresh channel."""
    channel = Channel("127.0.0.1", port, ssl=context)
    try:
        with anyio.fail_after(10):
            async with channel.request(
                path, Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse
            ) as stream:
                await stream.send_message(HealthCheckRequest(), end=True)
                reply: Any = await stream.recv_message()
                await stream.recv_trailing_metadata()
        assert isinstance(reply, HealthCheckResponse)
        return reply
    finally:
        channel.close()


@dataclass
class Handshake:
    """What each side of one raw TLS connection saw (see :func:`tls_handshake`)."""

    server_error: BaseException | None = None
    client_error: BaseException | None = None
    version: str | None = None
    alpn: str | None = None
    echo: bytes | None = None


def tls_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "localhost"
) -> Handshake:
    """Connect ``client`` to a one-shot echo server using ``server`` over 127.0.0.1.

    Plain blocking sockets with a server thread, so the server's own handshake error (the
    reason for a refusal) can be observed; the client sends 4 bytes and reads them back.
    """
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server.wrap_socket(conn, server_side=True) as tls:
                result.version = tls.version()
                result.alpn = tls.selected_alpn_protocol()
                tls.sendall(tls.recv(4))
        except OSError as exc:  # ssl.SSLError is an OSError
            result.server_error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"ping")
            result.echo = tls.recv(4)
    except OSError as exc:
        result.client_error = exc
    finally:
        thread.join(5)
        listener.close()
    assert not thread.is_alive(), "the TLS test server did not finish"
    return result
