"""Identity, policy, audit and the RecvRequest hook, the last over real mutual TLS on loopback.

What a client sees when it is refused (as observed with grpclib 0.4.9, TLS 1.3):

* refused by the TLS handshake (no certificate, another CA, expired, serverAuth-only, the
  server's own certificate): ``StreamTerminatedError("Connection lost")`` on first read;
* a TLS 1.2-only client: ``ConnectionResetError``;
* a valid certificate with no role or an unknown role: ``GRPCError(PERMISSION_DENIED)``;
* no TLS at all (a plaintext server): ``GRPCError(UNAUTHENTICATED)``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from datetime import UTC, datetime, timedelta

import anyio
import pki
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_pb2 import HealthCheckResponse
from grpclib.protocol import Peer

from jobworker.auth import (
    Identity,
    Role,
    Rpc,
    audit,
    authorize,
    authorize_path,
    can_see,
    current_identity,
    identity_from_der,
    peer_certificate_der,
    use_identity,
)
from jobworker.auth.audit import AUDIT_LOGGER, MAX_FIELD_CHARS, using_connection
from jobworker.auth.hook import peer_transport
from jobworker.auth.policy import split_path
from jobworker.auth.roles import ROLE_OID, decode_utf8string, encode_utf8string, parse_role
from jobworker.certs import create_ca, create_client_cert
from jobworker.errors import InvalidArgument, PermissionDenied, Unauthenticated

ADMIN = Identity("admin", Role.ADMIN)
ALICE = Identity("alice", Role.USER)
WORKER = "/jobworker.v1.Worker/"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiFixture:
    return pki.build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    return caplog


def audit_lines(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == AUDIT_LOGGER]


# --- the role's encoding ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["admin", "user", "", "é", "x" * 127, "y" * 128, "z" * 300])
def test_utf8string_round_trip(text: str) -> None:
    der = encode_utf8string(text)
    assert der[0] == 0x0C
    assert decode_utf8string(der) == text


def test_utf8string_encoding_is_der() -> None:
    assert encode_utf8string("admin") == b"\x0c\x05admin"
    assert encode_utf8string("a" * 200) == b"\x0c\x81\xc8" + b"a" * 200
    assert encode_utf8string("a" * 300) == b"\x0c\x82\x01\x2c" + b"a" * 300


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x0c",
        b"\x13\x05admin",  # PrintableString, not UTF8String
        b"\x0c\x05admi",  # too short
        b"\x0c\x05admin!",  # trailing byte
        b"\x0c\x81\x05admin",  # non-minimal length
        b"\x0c\x80",  # indefinite length
        b"\x0c\x02\xff\xfe",  # not UTF-8
    ],
)
def test_utf8string_rejects_non_der(der: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the reason does not matter here
        decode_utf8string(der)


def test_parse_role() -> None:
    assert parse_role("admin") is Role.ADMIN
    assert parse_role("user") is Role.USER
    with pytest.raises(InvalidArgument, match="admin, user"):
        parse_role("root")


def test_role_oid_is_under_the_uuid_arc() -> None:
    assert ROLE_OID.dotted_string == "2.25.291025533363862350438496835239366511582"


# --- identity from a certificate --------------------------------------------------------


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def raw_cert(subject: x509.Name, *extensions: x509.ExtensionType) -> bytes:
    """A self-signed certificate with exactly this subject and these extensions."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return der_of(builder.sign(key, hashes.SHA256()))


def role_ext(der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(ROLE_OID, der)


def cn(*names: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names])


@pytest.mark.parametrize("role", list(Role))
def test_identity_from_a_client_certificate(role: Role) -> None:
    pair = create_client_cert(create_ca("CA"), "carol", role)
    assert identity_from_der(der_of(pair.cert)) == Identity("carol", role)


def test_identity_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ADMIN.name = "mallory"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"", "no client certificate"),
        (b"\x30\x03\x02\x01\x00", "cannot be parsed"),
        (raw_cert(x509.Name([]), role_ext(encode_utf8string("admin"))), "has 0"),
        (raw_cert(cn("a", "b"), role_ext(encode_utf8string("admin"))), "has 2"),
    ],
    ids=["empty", "garbage", "no-cn", "two-cns"],
)
def test_no_usable_name_is_unauthenticated(der: bytes, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        identity_from_der(der)


@pytest.mark.filterwarnings("ignore:Attribute's length must be")
def test_an_empty_common_name_is_unauthenticated() -> None:
    # cryptography builds (and reads) an empty CN only with a warning; other tools may not.
    empty = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "", _validate=False)])
    with pytest.raises(Unauthenticated, match="is empty"):
        identity_from_der(raw_cert(empty, role_ext(encode_utf8string("admin"))))


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (raw_cert(cn("dave")), "carries no role"),
        (raw_cert(cn("dave"), role_ext(encode_utf8string("root"))), "unknown role 'root'"),
        (raw_cert(cn("dave"), role_ext(encode_utf8string("Admin"))), "unknown role 'Admin'"),
        (raw_cert(cn("dave"), role_ext(encode_utf8string(""))), "unknown role ''"),
        (raw_cert(cn("dave"), role_ext(b"\x13\x05admin")), "malformed role"),
        (raw_cert(cn("dave"), role_ext(b"\x0c\x05admin\x00")), "malformed role"),
    ],
    ids=["missing", "root", "case", "empty", "printable", "trailing"],
)
def test_a_bad_role_is_permission_denied(der: bytes, message: str) -> None:
    with pytest.raises(PermissionDenied, match=message):
        identity_from_der(der)


def duplicated_role_cert() -> bytes:
    """A certificate carrying the role extension twice (no builder makes one: the second
    is added under a placeholder OID of the same length, then renamed in the DER; the
    identity code reads the DER without checking the signature, as TLS already did)."""
    placeholder = x509.ObjectIdentifier(ROLE_OID.dotted_string[:-1] + "3")
    ext = x509.UnrecognizedExtension(placeholder, encode_utf8string("admin"))
    der = raw_cert(cn("mallory"), role_ext(encode_utf8string("user")), ext)
    old, new = _oid_der(placeholder), _oid_der(ROLE_OID)
    assert len(old) == len(new) and der.count(old) == 1
    return der.replace(old, new)


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = b""
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return bytes([0x06, len(body)]) + body


def test_a_duplicated_role_extension_is_permission_denied_not_a_crash() -> None:
    with pytest.raises(PermissionDenied, match="more than once"):
        identity_from_der(duplicated_role_cert())


# --- the pure policy --------------------------------------------------------------------

ALLOWED = {
    (Role.ADMIN, Rpc.START_JOB): True,
    (Role.ADMIN, Rpc.STOP_JOB): True,
    (Role.ADMIN, Rpc.GET_JOB_STATUS): True,
    (Role.ADMIN, Rpc.LIST_JOBS): True,
    (Role.ADMIN, Rpc.STREAM_JOB_OUTPUT): True,
    (Role.ADMIN, Rpc.REMOVE_JOB): True,
    (Role.ADMIN, Rpc.PRUNE_JOBS): True,
    (Role.USER, Rpc.START_JOB): True,
    (Role.USER, Rpc.STOP_JOB): False,
    (Role.USER, Rpc.GET_JOB_STATUS): True,
    (Role.USER, Rpc.LIST_JOBS): True,
    (Role.USER, Rpc.STREAM_JOB_OUTPUT): True,
    (Role.USER, Rpc.REMOVE_JOB): True,
    (Role.USER, Rpc.PRUNE_JOBS): True,
}


def test_the_table_covers_every_role_and_rpc() -> None:
    assert set(ALLOWED) == {(role, rpc) for role in Role for rpc in Rpc}
    assert {rpc.value for rpc in Rpc} == {
        "StartJob",
        "StopJob",
        "GetJobStatus",
        "ListJobs",
        "StreamJobOutput",
        "RemoveJob",
        "PruneJobs",
    }


@pytest.mark.parametrize(("role", "rpc"), sorted(ALLOWED))
def test_authorize(role: Role, rpc: Rpc) -> None:
    identity = Identity("someone", role)
    if ALLOWED[role, rpc]:
        authorize(identity, rpc.value)
        authorize_path(identity, WORKER + rpc.value)
    else:
        with pytest.raises(PermissionDenied, match=rpc.value):
            authorize(identity, rpc.value)
        with pytest.raises(PermissionDenied):
            authorize_path(identity, WORKER + rpc.value)


@pytest.mark.parametrize("identity", [ADMIN, ALICE])
@pytest.mark.parametrize("rpc", ["DeleteEverything", "stopjob", "", "StartJob "])
def test_unknown_rpcs_are_denied(identity: Identity, rpc: str) -> None:
    with pytest.raises(PermissionDenied):
        authorize(identity, rpc)


@pytest.mark.parametrize("identity", [ADMIN, ALICE])
def test_health_checks_are_open_to_any_role(identity: Identity) -> None:
    authorize_path(identity, "/grpc.health.v1.Health/Check")
    authorize_path(identity, "/grpc.health.v1.Health/Watch")


@pytest.mark.parametrize("identity", [ADMIN, ALICE])
@pytest.mark.parametrize(
    "path",
    [
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/jobworker.v2.Worker/StartJob",
        "jobworker.v1.Worker/StartJob",
        "/jobworker.v1.Worker/StartJob/extra",
        "/jobworker.v1.Worker/",
        "",
    ],
)
def test_other_paths_are_denied(identity: Identity, path: str) -> None:
    with pytest.raises(PermissionDenied):
        authorize_path(identity, path)


def test_split_path() -> None:
    assert split_path("/jobworker.v1.Worker/StopJob") == ("jobworker.v1.Worker", "StopJob")
    assert split_path("/a/b/c") == ("", "/a/b/c")


@pytest.mark.parametrize(
    ("identity", "owner", "owner_role", "visible"),
    [
        (ADMIN, "admin", "admin", True),
        (ADMIN, "alice", "user", True),
        (ADMIN, "bob", "user", True),
        (ALICE, "alice", "user", True),
        (ALICE, "alice", "admin", False),  # an admin certificate named alice owns it
        (ALICE, "bob", "user", False),
        (ALICE, "admin", "admin", False),
        (ALICE, "Alice", "user", False),
        (ALICE, "", "", False),
        (Identity("admin", Role.USER), "bob", "user", False),  # the name "admin" is not the role
        (Identity("admin", Role.USER), "admin", "admin", False),  # nor are the admin's jobs its
    ],
)
def test_can_see(identity: Identity, owner: str, owner_role: str, visible: bool) -> None:
    assert can_see(identity, owner, owner_role) is visible


# --- audit lines and the identity context -----------------------------------------------


def test_audit_line(audit_log: pytest.LogCaptureFixture) -> None:
    audit(ALICE, "StopJob", "0b3c0c1e-8a8e-4a4e-9b9e-0c1e8a8e4a4e", Status.PERMISSION_DENIED)
    audit(ADMIN, "ListJobs")
    assert audit_lines(audit_log) == [
        "audit who=alice role=user rpc=StopJob job=0b3c0c1e-8a8e-4a4e-9b9e-0c1e8a8e4a4e "
        "outcome=permission_denied",
        "audit who=admin role=admin rpc=ListJobs job=- outcome=ok",
    ]
    assert getattr(audit_log.records[0], "audit")["who"] == "alice"  # noqa: B009


def test_audit_values_cannot_forge_lines_or_fields(audit_log: pytest.LogCaptureFixture) -> None:
    audit('eve\naudit who=admin outcome="ok"', "StartJob", None, "denied", detail="a b")
    (line,) = audit_lines(audit_log)
    assert "\n" not in line
    assert line == (
        'audit who="eve\\naudit who=admin outcome=\\"ok\\"" role=- rpc=StartJob job=- '
        'outcome=denied detail="a b"'
    )


def test_audit_fields_are_cut_to_a_fixed_size_with_the_full_size_noted(
    audit_log: pytest.LogCaptureFixture,
) -> None:
    huge = "a" * 1_000_000
    audit(ALICE, "GetJobStatus", huge, Status.INVALID_ARGUMENT, detail="é" * 100_000)
    (line,) = audit_lines(audit_log)
    assert len(line) < 4_000, "a 1 MB job id must not make a 1 MB line"
    assert f' job="{"a" * MAX_FIELD_CHARS}...[1000000 chars]" ' in line
    assert "[100000 chars]" in line
    assert getattr(audit_log.records[0], "audit")["job"].endswith("...[1000000 chars]")  # noqa: B009


def test_audit_lines_name_the_connection_when_known(audit_log: pytest.LogCaptureFixture) -> None:
    with using_connection("127.0.0.1:5000", "0A1B"):
        audit(ALICE, "ListJobs")
    audit(ALICE, "ListJobs")
    assert audit_lines(audit_log) == [
        "audit who=alice role=user rpc=ListJobs job=- outcome=ok peer=127.0.0.1:5000 serial=0A1B",
        "audit who=alice role=user rpc=ListJobs job=- outcome=ok",
    ]


def test_current_identity_needs_a_caller() -> None:
    with pytest.raises(Unauthenticated):
        current_identity()
    with use_identity(ALICE):
        assert current_identity() == ALICE
        with use_identity(ADMIN):
            assert current_identity() == ADMIN
        assert current_identity() == ALICE
    with pytest.raises(Unauthenticated):
        current_identity()


class _HasPeer:
    def __init__(self, peer: object) -> None:
        self.peer = peer


def test_peer_certificate_der_without_tls_is_none() -> None:
    transport = asyncio.Transport({"peername": ("127.0.0.1", 1)})  # a plain TCP connection
    plain = _HasPeer(Peer(transport))
    assert peer_transport(plain) is transport  # type: ignore[arg-type]
    assert peer_certificate_der(plain) is None  # type: ignore[arg-type]


def test_peer_certificate_der_fails_closed_if_grpclib_changes() -> None:
    assert peer_transport(_HasPeer(object())) is None  # type: ignore[arg-type]
    assert peer_certificate_der(_HasPeer(object())) is None  # type: ignore[arg-type]


# --- the hook over real mutual TLS ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(pki.GOOD_CLIENTS))
async def test_good_clients_pass_health_checks(
    ca: pki.PkiFixture, name: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with pki.running_server(ca.server_context()) as server:
        reply = await pki.call(server.port, ca.client_context(name))
    assert reply.status == HealthCheckResponse.SERVING
    assert audit_lines(audit_log) == []


@pytest.mark.anyio
@pytest.mark.parametrize(("role", "rpc"), sorted(ALLOWED))
async def test_the_hook_hands_every_worker_rpc_to_the_service(
    ca: pki.PkiFixture, role: Role, rpc: Rpc
) -> None:
    """The hook authenticates; the role's grant is the service's to check, once it has read
    the request, so that a refusal is audited with the job it targeted (test_api.py)."""
    name = {Role.ADMIN: "admin", Role.USER: "alice"}[role]
    async with pki.running_server(ca.server_context()) as server:
        reply = await pki.call(server.port, ca.client_context(name), WORKER + rpc.value)
        assert reply.status == HealthCheckResponse.SERVING
        (seen,) = server.worker.calls
        assert seen.rpc == rpc.value
        assert seen.identity == Identity(name, role)
        assert seen.peer_der == der_of(
            x509.load_pem_x509_certificate(ca.clients[name].cert.read_bytes())
        )


@pytest.mark.anyio
async def test_refused_calls_are_audited(
    ca: pki.PkiFixture, audit_log: pytest.LogCaptureFixture
) -> None:
    async with pki.running_server(ca.server_context()) as server:
        with pytest.raises(GRPCError) as refused:
            await pki.call(server.port, ca.client_context("norole"), WORKER + "StartJob")
        assert refused.value.status is Status.PERMISSION_DENIED
        assert server.worker.calls == []
    (line,) = audit_lines(audit_log)
    head, peer, serial = line.rsplit(" ", 2)
    assert head == (
        "audit who=norole role=- rpc=StartJob job=- outcome=permission_denied "
        "detail=\"certificate 'norole' carries no role\""
    )
    # The line names the connection: the client's address and its certificate's serial.
    assert re.fullmatch(r"peer=127\.0\.0\.1:\d+", peer)
    alice = x509.load_pem_x509_certificate(ca.clients["norole"].cert.read_bytes())
    assert serial.startswith("serial=")
    assert int(serial.removeprefix("serial="), 16) == alice.serial_number


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("norole", "certificate 'norole' carries no role"),
        ("badrole", "certificate 'badrole' has an unknown role 'root'"),
    ],
)
async def test_no_role_or_unknown_role_is_permission_denied(
    ca: pki.PkiFixture, name: str, detail: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with pki.running_server(ca.server_context()) as server:
        for path in (pki.HEALTH_CHECK, WORKER + "StartJob"):
            with pytest.raises(GRPCError) as refused:
                await pki.call(server.port, ca.client_context(name), path)
            assert refused.value.status is Status.PERMISSION_DENIED
            assert refused.value.message == detail
        assert server.worker.calls == []
    lines = audit_lines(audit_log)
    assert len(lines) == 2
    assert lines[0].startswith(f"audit who={name} role=- rpc=/grpc.health.v1.Health/Check ")
    assert lines[1].startswith(f"audit who={name} role=- rpc=StartJob job=- ")
    assert all("outcome=permission_denied" in line for line in lines)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["rogue", "expired", "serveronly", "server"])
async def test_bad_certificates_fail_the_handshake(
    ca: pki.PkiFixture, name: str, audit_log: pytest.LogCaptureFixture
) -> None:
    async with pki.running_server(ca.server_context()) as server:
        for path in (pki.HEALTH_CHECK, WORKER + "ListJobs"):
            with pytest.raises(StreamTerminatedError, match="Connection lost"):
                await pki.call(server.port, ca.client_context(name), path)
        assert server.worker.calls == []
    assert audit_lines(audit_log) == []  # refused before any request reached the hook


@pytest.mark.anyio
async def test_no_client_certificate_fails_the_handshake(ca: pki.PkiFixture) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(ca.paths.server_ca)
    anonymous.set_alpn_protocols(["h2"])
    async with pki.running_server(ca.server_context()) as server:
        with pytest.raises(StreamTerminatedError, match="Connection lost"):
            await pki.call(server.port, anonymous, WORKER + "ListJobs")
        assert server.worker.calls == []


@pytest.mark.anyio
async def test_a_tls12_client_is_reset(ca: pki.PkiFixture) -> None:
    old = ca.client_context("admin")
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with pki.running_server(ca.server_context()) as server:
        with pytest.raises(ConnectionResetError):
            await pki.call(server.port, old, WORKER + "ListJobs")
        assert server.worker.calls == []


@pytest.mark.anyio
async def test_without_tls_every_call_is_unauthenticated(
    audit_log: pytest.LogCaptureFixture,
) -> None:
    async with pki.running_server(None) as server:
        for path in (pki.HEALTH_CHECK, WORKER + "StartJob"):
            with pytest.raises(GRPCError) as refused:
                await pki.call(server.port, None, path)
            assert refused.value.status is Status.UNAUTHENTICATED
        assert server.worker.calls == []
    lines = audit_lines(audit_log)
    assert len(lines) == 2
    assert all(line.startswith("audit who=- role=- ") for line in lines)
    assert all("outcome=unauthenticated" in line for line in lines)


@pytest.mark.anyio
async def test_concurrent_callers_each_see_their_own_identity(ca: pki.PkiFixture) -> None:
    async with pki.running_server(ca.server_context()) as server:
        async with anyio.create_task_group() as group:
            for _ in range(5):
                for name in ("admin", "alice"):
                    group.start_soon(
                        pki.call, server.port, ca.client_context(name), WORKER + "ListJobs"
                    )
        seen = sorted(call.identity.name for call in server.worker.calls)
        assert seen == ["admin"] * 5 + ["alice"] * 5
        for call in server.worker.calls:
            cert = x509.load_der_x509_certificate(call.peer_der or b"")
            assert cert.subject.rfc4514_string() == f"CN={call.identity.name}"
