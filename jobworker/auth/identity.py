"""Who is calling: the identity read from a verified client certificate.

The TLS handshake has already proven that the client holds the key of a certificate issued
by the client CA, valid now, with EKU clientAuth. This module only reads that certificate:

* the name is the subject's common name: exactly one CN, non-empty;
* the role is the private extension described in :mod:`jobworker.auth.roles`.

Refusals, decided here and documented in ``docs/security.md``:

* no certificate, a certificate that does not parse, or a subject without exactly one
  non-empty CN: :class:`~jobworker.errors.Unauthenticated` (we cannot say who is calling);
* a well-named certificate with no role, an unknown role or a malformed role value:
  :class:`~jobworker.errors.PermissionDenied` (we know who is calling; they may do nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from jobworker.auth.roles import ROLE_OID, Role, decode_utf8string
from jobworker.errors import PermissionDenied, Unauthenticated

__all__ = ["Identity", "common_name", "identity_from_der", "load_peer_certificate"]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: its certificate's common name and its role."""

    name: str
    role: Role


def load_peer_certificate(der: bytes | None) -> x509.Certificate:
    """Parse the peer's DER certificate, or raise :class:`Unauthenticated`."""
    if not der:
        raise Unauthenticated("no client certificate was presented")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise Unauthenticated("the client certificate cannot be parsed") from None


def common_name(cert: x509.Certificate) -> str:
    """The subject's single, non-empty common name, or raise :class:`Unauthenticated`."""
    try:
        attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise Unauthenticated("the client certificate's subject cannot be read") from None
    if len(attributes) != 1:
        raise Unauthenticated(
            f"the client certificate's subject must have exactly one common name, "
            f"it has {len(attributes)}"
        )
    value = attributes[0].value
    name = value if isinstance(value, str) else value.decode("utf-8", errors="replace")
    if not name:
        raise Unauthenticated("the client certificate's common name is empty")
    return name


def _role(cert: x509.Certificate, name: str) -> Role:
    try:
        extension = cert.extensions.get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        raise PermissionDenied(f"certificate {name!r} carries no role") from None
    except x509.DuplicateExtension as exc:
        raise PermissionDenied(
            f"certificate {name!r} carries the extension {exc.oid.dotted_string} more than once"
        ) from None
    except ValueError:
        raise PermissionDenied(f"certificate {name!r} has unreadable extensions") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise PermissionDenied(f"certificate {name!r} has a malformed role")
    try:
        text = decode_utf8string(value.value)
    except ValueError:
        raise PermissionDenied(f"certificate {name!r} has a malformed role") from None
    try:
        return Role(text)
    except ValueError:
        raise PermissionDenied(f"certificate {name!r} has an unknown role {text!r}") from None


def identity_from_der(der: bytes) -> Identity:
    """Build the caller's :class:`Identity` from its DER client certificate.

    Raises :class:`Unauthenticated` when no name can be read and :class:`PermissionDenied`
    when the name is fine but the role is missing, malformed or unknown.
    """
    cert = load_peer_certificate(der)
    name = common_name(cert)
    return Identity(name=name, role=_role(cert, name))
