"""Roles and how a client certificate carries one.

A caller's role travels inside its client certificate as a private, non-critical X.509 v3
extension:

* OID :data:`ROLE_OID` = ``2.25.291025533363862350438496835239366511582``. Arc ``2.25`` holds
  OIDs made from a UUID (ITU-T X.667), so it needs no registration; this one is the decimal
  form of UUID ``daf17a9b-11cb-4073-9960-334dac2e4bde``.
* Value: the DER encoding of one ASN.1 ``UTF8String`` holding the role's name, ``admin`` or
  ``user`` (tag ``0x0C``, a DER length, the UTF-8 bytes).

The extension is non-critical because OpenSSL refuses certificates with unknown critical
extensions; the server reads it after the handshake (see :mod:`jobworker.auth.identity`).
"""

from __future__ import annotations

import enum
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from jobworker.errors import InvalidArgument

__all__ = [
    "ROLE_OID",
    "Role",
    "decode_utf8string",
    "encode_utf8string",
    "parse_role",
    "role_extension",
]

ROLE_OID: Final = ObjectIdentifier("2.25.291025533363862350438496835239366511582")

_UTF8STRING_TAG: Final = 0x0C


class Role(enum.StrEnum):
    """What a caller may do; see :mod:`jobworker.auth.policy` for the exact table."""

    ADMIN = "admin"
    """May call every RPC on every job."""

    USER = "user"
    """May call every RPC except ``StopJob``, and only on the jobs it started."""


def parse_role(text: str) -> Role:
    """Return the role named ``text`` (``admin`` or ``user``) or raise :class:`InvalidArgument`."""
    try:
        return Role(text)
    except ValueError:
        accepted = ", ".join(role.value for role in Role)
        raise InvalidArgument(f"unknown role {text!r}: accepted roles are {accepted}") from None


def encode_utf8string(text: str) -> bytes:
    """DER-encode ``text`` as an ASN.1 UTF8String (tag, minimal length, UTF-8 bytes)."""
    body = text.encode("utf-8")
    size = len(body)
    if size < 0x80:
        header = bytes([_UTF8STRING_TAG, size])
    else:
        length = size.to_bytes((size.bit_length() + 7) // 8, "big")
        header = bytes([_UTF8STRING_TAG, 0x80 | len(length)]) + length
    return header + body


def decode_utf8string(der: bytes) -> str:
    """Decode one DER UTF8String that fills ``der`` exactly, or raise :class:`ValueError`.

    Only DER is accepted: the minimal length form, no trailing bytes, valid UTF-8.
    """
    if len(der) < 2 or der[0] != _UTF8STRING_TAG:
        raise ValueError("not a DER UTF8String")
    first = der[1]
    if first < 0x80:
        size, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or len(der) < 2 + count:
            raise ValueError("bad DER length")
        size = int.from_bytes(der[2 : 2 + count], "big")
        start = 2 + count
        if size < 0x80 or der[2] == 0:
            raise ValueError("non-minimal DER length")
    if len(der) != start + size:
        raise ValueError("DER length does not match the value")
    return der[start:].decode("utf-8")


def role_extension(role: Role) -> x509.UnrecognizedExtension:
    """The certificate extension that carries ``role`` (add it as non-critical)."""
    return x509.UnrecognizedExtension(ROLE_OID, encode_utf8string(role.value))
