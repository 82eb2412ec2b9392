"""The server's TLS settings: TLS 1.3 only, a client certificate required, ALPN h2.

Clients are verified against the client CA only (never the server CA), so a server
certificate can never act as a client. OpenSSL also checks the client certificate's EKU
(clientAuth) because the context verifies it for the SSL-client purpose.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["server_ssl_context"]

StrPath = str | os.PathLike[str]


def server_ssl_context(cert: StrPath, key: StrPath, client_ca: StrPath) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key`` that requires a ``client_ca`` client cert.

    Settings: ``PROTOCOL_TLS_SERVER``, minimum and only version TLS 1.3, ``CERT_REQUIRED``
    (set explicitly: the server default is ``CERT_NONE``), strict X.509 checks, ALPN ``h2``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certfile=cert, keyfile=key)
    context.load_verify_locations(cafile=client_ca)
    context.set_alpn_protocols(["h2"])
    return context
