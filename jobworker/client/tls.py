"""The client's TLS settings: TLS 1.3 only, the server verified against its own CA, ALPN h2.

Loading the files names the one that is missing or unusable (:class:`CredentialsError`),
rather than OpenSSL's ``PEM lib``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from jobworker.errors import CredentialsError

__all__ = ["client_ssl_context"]

StrPath = str | os.PathLike[str]


def _check_file(what: str, path: Path, setting: str) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        raise CredentialsError(f"{what} {path} does not exist", setting) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {path}: {exc.strerror}", setting) from None
    if b"-----BEGIN " not in head:
        raise CredentialsError(f"{what} {path} is not a PEM file", setting)


def _certificate_loads(path: Path) -> bool:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        return False
    return True


def client_ssl_context(cert: StrPath, key: StrPath, server_ca: StrPath) -> ssl.SSLContext:
    """A client context presenting ``cert``/``key`` that trusts only ``server_ca``.

    Settings: ``PROTOCOL_TLS_CLIENT``, minimum version TLS 1.3, ``CERT_REQUIRED`` with host
    name checking (against the server certificate's SANs), strict X.509 checks, ALPN ``h2``.
    The system trust store is not loaded: only the jobworker server CA is trusted.
    """
    cert, key, server_ca = Path(cert), Path(key), Path(server_ca)
    _check_file("client certificate", cert, "cert")
    _check_file("client key", key, "key")
    _check_file("server CA", server_ca, "ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        if not _certificate_loads(cert):
            raise CredentialsError(
                f"client certificate {cert} is not a valid PEM certificate", "cert"
            ) from None
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CredentialsError(
                f"client key {key} does not belong to certificate {cert}", "key"
            ) from None
        raise CredentialsError(f"client key {key} is not a valid PEM private key", "key") from None
    try:
        context.load_verify_locations(cafile=server_ca)
    except ssl.SSLError:
        raise CredentialsError(
            f"server CA {server_ca} is not a valid PEM certificate", "ca"
        ) from None
    context.set_alpn_protocols(["h2"])
    return context
