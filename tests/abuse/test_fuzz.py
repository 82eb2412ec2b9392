"""A property-based fuzzer (hypothesis) over every request message and the role extension.

Each generated request goes to a real server over real TLS on one hand-made HTTP/2
connection; whatever the bytes, the answer is a status the caller can act on, never UNKNOWN
or INTERNAL, and the server goes on serving. Quick by default; ``JOBWORKER_ABUSE_FULL=1``
runs 10,000 cases per message.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator

import pytest
from conftest import FULL, AbusePki, served
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2raw import RawH2, frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker._proto.jobworker import v1 as pb
from jobworker.auth.identity import identity_from_der
from jobworker.auth.roles import ROLE_OID, decode_utf8string
from jobworker.errors import PermissionDenied, Unauthenticated
from jobworker.server.app import JobworkerServer

pytestmark = [pytest.mark.abuse, pytest.mark.anyio]

CASES = 10_000 if FULL else 150
PATHS = [
    "/jobworker.v1.Worker/StartJob",
    "/jobworker.v1.Worker/StopJob",
    "/jobworker.v1.Worker/GetJobStatus",
    "/jobworker.v1.Worker/ListJobs",
    "/jobworker.v1.Worker/StreamJobOutput",
]
# What a caller may get for a request it made up: anything it can act on. Never UNKNOWN (2)
# or INTERNAL (13).
ANSWERABLE = {0, 3, 5, 7, 8, 9, 14}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def protobuf_like(draw: st.DrawFn) -> bytes:
    """Fields with any number and wire type, and payloads that may or may not fit it."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(1, 40))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(0, 2**70)))
        elif wire == 2:
            body = draw(st.binary(max_size=64))
            length = draw(st.one_of(st.just(len(body)), st.integers(0, 2**40)))
            out += _varint(length) + body
        else:
            out += draw(st.binary(max_size=9))
    return bytes(out)


_TEXT = st.text(max_size=40)
# Well-formed messages of each request type, with strange values; sent to every method.
_VALID = st.one_of(
    st.builds(
        lambda program, args: bytes(pb.StartJobRequest(program=program, args=args)),
        _TEXT,
        st.lists(_TEXT, max_size=3),
    ),
    st.builds(
        lambda job_id, offset: bytes(pb.StreamJobOutputRequest(job_id=job_id, offset=offset)),
        _TEXT,
        st.integers(0, 2**64 - 1),
    ),
    st.builds(lambda job_id: bytes(pb.GetJobStatusRequest(job_id=job_id)), _TEXT),
)
REQUESTS = st.one_of(st.binary(max_size=200), protobuf_like(), _VALID)


@pytest.fixture
async def raw(server: JobworkerServer, abuse_pki: AbusePki) -> AsyncIterator[RawH2]:
    connection = await RawH2.open(server.port, abuse_pki.context("alice"))
    try:
        yield connection
    finally:
        await connection.aclose()


@pytest.mark.parametrize("path", PATHS)
@settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=REQUESTS)
async def test_no_request_gets_unknown_or_internal(path: str, body: bytes, raw: RawH2) -> None:
    reply = await raw.call(path, frame(body), seconds=30)
    assert reply.status in ANSWERABLE, (body, reply.headers)


async def test_the_server_still_serves_after_the_fuzzing(
    server: JobworkerServer, abuse_pki: AbusePki, raw: RawH2
) -> None:
    for path in PATHS:
        reply = await raw.call(path, frame(b"\x0a\x03abc"), seconds=30)
        assert reply.status in ANSWERABLE
    await served(abuse_pki, server.port)


@settings(max_examples=CASES, deadline=None)
@given(der=st.binary(max_size=80))
def test_any_role_value_is_decoded_or_refused(der: bytes) -> None:
    try:
        text = decode_utf8string(der)
    except ValueError:
        return
    assert isinstance(text, str)


_KEY = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=min(CASES, 300), deadline=None)
@given(
    value=st.one_of(st.binary(max_size=40), st.sampled_from([b"\x0c\x05admin", b"\x0c\x04user"]))
)
def test_any_role_extension_gives_an_identity_or_a_refusal(value: bytes) -> None:
    der = _certificate_with_role(value)
    try:
        identity = identity_from_der(der)
    except (Unauthenticated, PermissionDenied):
        return
    assert identity.role.value in ("admin", "user")


def _certificate_with_role(value: bytes) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(ROLE_OID, value), critical=False)
        .sign(_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)
