"""The client's TLS settings: TLS 1.3 only, the server verified against its own CA, ALPN h2."""

from __future__ import annotations

import os
import ssl

__all__ = ["client_ssl_context"]

StrPath = str | os.PathLike[str]


def client_ssl_context(cert: StrPath, key: StrPath, server_ca: StrPath) -> ssl.SSLContext:
    """A client context presenting ``cert``/``key`` that trusts only ``server_ca``.

    Settings: ``PROTOCOL_TLS_CLIENT``, minimum version TLS 1.3, ``CERT_REQUIRED`` with host
    name checking (against the server certificate's SANs), strict X.509 checks, ALPN ``h2``.
    The system trust store is not loaded: only the jobworker server CA is trusted.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certfile=cert, keyfile=key)
    context.load_verify_locations(cafile=server_ca)
    context.set_alpn_protocols(["h2"])
    return context
