"""The TLS contexts: their settings, and which handshakes they complete or refuse, and why.

These run over raw TLS sockets on 127.0.0.1 (no gRPC), so the server's own handshake error
can be checked: each refusal must happen for its stated reason, not by accident.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pki
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from jobworker.client.tls import client_ssl_context
from jobworker.server.tls import server_ssl_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiFixture:
    return pki.build_pki(tmp_path_factory.mktemp("pki"))


def test_server_context_settings(ca: pki.PkiFixture) -> None:
    context = ca.server_context()
    assert context.protocol is ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.get_ca_certs(binary_form=True) == [ca.client_ca.cert.public_bytes(Encoding.DER)]


def test_client_context_settings(ca: pki.PkiFixture) -> None:
    context = ca.client_context("admin")
    assert context.protocol is ssl.PROTOCOL_TLS_CLIENT
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs(binary_form=True) == [ca.server_ca.cert.public_bytes(Encoding.DER)]


@pytest.mark.parametrize("name", sorted(pki.GOOD_CLIENTS))
def test_good_clients_get_tls13_and_h2(ca: pki.PkiFixture, name: str) -> None:
    result = pki.tls_handshake(ca.server_context(), ca.client_context(name))
    assert result.server_error is None
    assert result.client_error is None
    assert result.version == "TLSv1.3"
    assert result.alpn == "h2"
    assert result.echo == b"ping"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_server_certificate_names_cover_loopback(ca: pki.PkiFixture, host: str) -> None:
    result = pki.tls_handshake(ca.server_context(), ca.client_context("admin"), host)
    assert result.client_error is None
    assert result.echo == b"ping"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rogue", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("serveronly", "unsuitable certificate purpose"),
        ("server", "certificate in certificate chain"),
    ],
)
def test_server_refuses_bad_client_certificates(ca: pki.PkiFixture, name: str, reason: str) -> None:
    result = pki.tls_handshake(ca.server_context(), ca.client_context(name))
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert reason in result.server_error.verify_message
    # the client sees the alert, or a reset if its data reached the already closed socket
    assert isinstance(result.client_error, ssl.SSLError | ConnectionResetError)
    assert result.echo is None


def test_server_requires_a_client_certificate(ca: pki.PkiFixture) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(ca.paths.server_ca)
    result = pki.tls_handshake(ca.server_context(), anonymous)
    assert isinstance(result.server_error, ssl.SSLError)
    assert result.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    # the client sees the alert, or a reset if its data reached the already closed socket
    assert isinstance(result.client_error, ssl.SSLError | ConnectionResetError)
    assert result.echo is None


def test_server_refuses_tls12(ca: pki.PkiFixture) -> None:
    old = ca.client_context("admin")
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = pki.tls_handshake(ca.server_context(), old)
    assert isinstance(result.server_error, ssl.SSLError)
    assert result.server_error.reason == "UNSUPPORTED_PROTOCOL"
    assert isinstance(result.client_error, ssl.SSLError)
    assert result.client_error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_client_refuses_tls12_server(ca: pki.PkiFixture) -> None:
    """A server that offers at most TLS 1.2 cannot agree on a version with our client."""
    old = ca.server_context()
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = pki.tls_handshake(old, ca.client_context("admin"))
    assert isinstance(result.client_error, ssl.SSLError)
    assert result.client_error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert result.echo is None


def test_client_checks_the_server_name(ca: pki.PkiFixture) -> None:
    result = pki.tls_handshake(ca.server_context(), ca.client_context("admin"), "evil.example")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in result.client_error.verify_message


def test_client_refuses_a_server_from_another_ca(ca: pki.PkiFixture, tmp_path: Path) -> None:
    other = pki.build_pki(tmp_path)
    result = pki.tls_handshake(other.server_context(), ca.client_context("admin"))
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in result.client_error.verify_message


def test_client_does_not_trust_the_client_ca_for_servers(ca: pki.PkiFixture) -> None:
    """A certificate from the client CA (here: admin's, used as a server) is no server."""
    impostor = server_ssl_context(ca.paths.admin_cert, ca.paths.admin_key, ca.paths.client_ca)
    client = client_ssl_context(ca.paths.admin_cert, ca.paths.admin_key, ca.paths.server_ca)
    result = pki.tls_handshake(impostor, client)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
