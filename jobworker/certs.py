"""The PKI of a jobworker deployment: two CAs, a server certificate, role-bearing clients.

Layout of a PKI directory (what :func:`init_pki` writes)::

    server-ca.pem  server-ca-key.pem    signs server certificates; clients trust it
    client-ca.pem  client-ca-key.pem    signs client certificates; the server trusts it
    server.pem     server-key.pem       the server's certificate (EKU serverAuth)
    admin.pem      admin-key.pem        a client certificate: CN admin, role admin

and :func:`issue_client` adds ``NAME.pem`` + ``NAME-key.pem`` per client.

The two CAs are separate so that neither side can impersonate the other: a server
certificate is not signed by the client CA and so can never be accepted as a client, and
a client certificate can never pass as the server.

All keys are ECDSA P-256, all signatures ECDSA with SHA-256. Validity: CAs 10 years, the
server 1 year, clients 90 days by default; each starts 5 minutes in the past to tolerate
clock skew. Private keys are written unencrypted (PKCS#8 PEM) with mode 0600 from the moment
the file is created, then moved into place atomically; certificates are written 0644.
The client role travels in the extension described in :mod:`jobworker.auth.roles`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from jobworker.auth.roles import Role, parse_role, role_extension
from jobworker.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "DEFAULT_HOSTS",
    "MAX_DAYS",
    "SERVER_DAYS",
    "CertAndKey",
    "ClientPaths",
    "PkiExists",
    "PkiMissing",
    "PkiPaths",
    "create_ca",
    "create_client_cert",
    "create_server_cert",
    "init_pki",
    "issue_client",
    "load_cert_and_key",
    "validate_client_name",
]

CA_DAYS: Final = 3650
SERVER_DAYS: Final = 365
CLIENT_DAYS: Final = 90
MAX_DAYS: Final = 3650
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")

_CLOCK_SKEW: Final = timedelta(minutes=5)
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_CLIENT_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES: Final = frozenset({"server", "server-ca", "client-ca"})
_DNS_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

StrPath = str | os.PathLike[str]


class PkiExists(FailedPrecondition):
    """The files to be written already exist and overwriting was not asked for."""


class PkiMissing(FailedPrecondition):
    """The CA needed to issue a certificate is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class CertAndKey:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True, slots=True)
class ClientPaths:
    """Where a client certificate and its key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class PkiPaths:
    """The files of a PKI directory (see the module docstring)."""

    directory: Path
    server_ca: Path
    server_ca_key: Path
    client_ca: Path
    client_ca_key: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path

    @classmethod
    def in_dir(cls, directory: StrPath) -> PkiPaths:
        """The standard file names inside ``directory`` (nothing is read or written)."""
        base = Path(directory)
        return cls(
            directory=base,
            server_ca=base / "server-ca.pem",
            server_ca_key=base / "server-ca-key.pem",
            client_ca=base / "client-ca.pem",
            client_ca_key=base / "client-ca-key.pem",
            server_cert=base / "server.pem",
            server_key=base / "server-key.pem",
            admin_cert=base / "admin.pem",
            admin_key=base / "admin-key.pem",
        )

    def files(self) -> tuple[Path, ...]:
        """Every file of the PKI, certificates before keys of each pair."""
        return (
            self.server_ca,
            self.server_ca_key,
            self.client_ca,
            self.client_ca_key,
            self.server_cert,
            self.server_key,
            self.admin_cert,
            self.admin_key,
        )

    def exists(self) -> bool:
        """Whether every file of the PKI is present."""
        return all(path.exists() for path in self.files())


# --- validation -------------------------------------------------------------------------


def validate_client_name(name: str) -> str:
    """Return ``name`` if it is a safe client name, else raise :class:`InvalidArgument`.

    Accepted: 1 to 64 letters, digits, ``.``, ``_`` and ``-``, not starting with ``.`` or
    ``-``, not ending in ``-key`` and not one of the PKI's own names (server, server-ca,
    client-ca), so that ``NAME.pem`` and ``NAME-key.pem`` never clash with other files.
    """
    if not _CLIENT_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid client name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            f"not starting with '.' or '-'"
        )
    if name in _RESERVED_NAMES or name.endswith("-key"):
        raise InvalidArgument(f"invalid client name {name!r}: it clashes with the PKI's files")
    return name


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"invalid validity {days!r} days: use 1 to {MAX_DAYS}")
    return days


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not labels or len(name) > 253 or not all(_DNS_LABEL.fullmatch(lb) for lb in labels):
        raise InvalidArgument(
            f"invalid host {host!r}: use a DNS name (letters, digits, '-', '.') or an IP address"
        )
    return x509.DNSName(name)


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - _CLOCK_SKEW
    if not_after is not None:
        end = not_after
    else:
        end = (not_before if not_before is not None else now) + timedelta(days=_validate_days(days))
    if end <= start:
        raise InvalidArgument("a certificate's validity must end after it starts")
    return start, end


# --- building certificates --------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jobworker"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _leaf_builder(
    ca: CertAndKey,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    validity: tuple[datetime, datetime],
    extended_key_usage: Sequence[ObjectIdentifier],
) -> x509.CertificateBuilder:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    return builder


def create_ca(
    common_name: str,
    *,
    days: int = CA_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> CertAndKey:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = _new_key()
    start, end = _validity(days, not_before, not_after)
    subject = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert, key)


def create_server_cert(
    ca: CertAndKey,
    hosts: Iterable[str] = (),
    *,
    days: int = SERVER_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extended_key_usage: Sequence[ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> CertAndKey:
    """A server certificate signed by ``ca`` for ``hosts`` plus localhost, 127.0.0.1, ::1."""
    names: list[x509.GeneralName] = []
    for host in (*hosts, *DEFAULT_HOSTS):
        general = _general_name(host)
        if general not in names:
            names.append(general)
    key = _new_key()
    validity = _validity(days, not_before, not_after)
    cert = (
        _leaf_builder(ca, _name("jobworker server"), key, validity, extended_key_usage)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert, key)


def create_client_cert(
    ca: CertAndKey,
    name: str,
    role: Role | None,
    *,
    days: int = CLIENT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extended_key_usage: Sequence[ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    extra_extensions: Sequence[x509.ExtensionType] = (),
) -> CertAndKey:
    """A client certificate signed by ``ca``: subject CN ``name``, the ``role`` extension.

    ``role=None`` leaves the role out and ``extra_extensions`` (added non-critical) can carry
    anything else; both exist so that tests can build certificates the server must refuse.
    """
    if not 1 <= len(name) <= 64:
        raise InvalidArgument(f"invalid common name {name!r}: use 1 to 64 characters")
    key = _new_key()
    validity = _validity(days, not_before, not_after)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = _leaf_builder(ca, subject, key, validity, extended_key_usage)
    extensions: list[x509.ExtensionType] = [] if role is None else [role_extension(role)]
    for extension in (*extensions, *extra_extensions):
        builder = builder.add_extension(extension, critical=False)
    return CertAndKey(builder.sign(ca.key, hashes.SHA256()), key)


# --- files ------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, then link or rename.

    A private key's temporary file is created with mode 0600, so the key is never readable
    by others, not even for a moment. Without ``overwrite``, an existing ``path`` raises
    :class:`PkiExists` and is left untouched.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, _KEY_MODE if private else _CERT_MODE)
    try:
        with os.fdopen(fd, "wb") as stream:
            if not private:
                os.fchmod(stream.fileno(), _CERT_MODE)  # a public certificate: ignore umask
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PkiExists(f"{path} already exists; pass --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_pair(cert: Path, key: Path, pair: CertAndKey, *, overwrite: bool) -> None:
    _write_file(key, pair.key_pem(), private=True, overwrite=overwrite)
    _write_file(cert, pair.cert_pem(), private=False, overwrite=overwrite)


def _refuse_existing(paths: Iterable[Path], what: str) -> None:
    existing = [path.name for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise PkiExists(
            f"{what} already exists ({', '.join(existing)}); pass --force to replace it"
        )


def init_pki(directory: StrPath, hosts: Iterable[str] = (), *, force: bool = False) -> PkiPaths:
    """Create a complete PKI in ``directory`` (created 0700 if absent) and return its paths.

    ``hosts`` are added to the server certificate's SANs. An existing PKI (any of its files)
    is refused with :class:`PkiExists` unless ``force`` is true; replacing the CAs makes
    every certificate issued before unusable.
    """
    paths = PkiPaths.in_dir(directory)
    host_list = list(hosts)
    for host in host_list:
        _general_name(host)
    if not force:
        _refuse_existing(paths.files(), f"a PKI in {paths.directory}")
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    server_ca = create_ca("jobworker server CA")
    client_ca = create_ca("jobworker client CA")
    server = create_server_cert(server_ca, host_list)
    admin = create_client_cert(client_ca, "admin", Role.ADMIN)
    _write_pair(paths.server_ca, paths.server_ca_key, server_ca, overwrite=force)
    _write_pair(paths.client_ca, paths.client_ca_key, client_ca, overwrite=force)
    _write_pair(paths.server_cert, paths.server_key, server, overwrite=force)
    _write_pair(paths.admin_cert, paths.admin_key, admin, overwrite=force)
    return paths


def load_cert_and_key(cert_path: StrPath, key_path: StrPath) -> CertAndKey:
    """Read a PEM certificate and its unencrypted EC private key; raise PkiMissing if unusable."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiMissing(f"{exc.filename} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PkiMissing(f"cannot load {cert_path} and {key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiMissing(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise PkiMissing(f"{key_path} is not the key of {cert_path}")
    return CertAndKey(cert, key)


def issue_client(
    directory: StrPath,
    name: str,
    role: Role | str,
    days: int = CLIENT_DAYS,
    *,
    force: bool = False,
) -> ClientPaths:
    """Issue ``NAME.pem`` and ``NAME-key.pem`` in ``directory``, signed by its client CA.

    ``name`` must pass :func:`validate_client_name`, ``role`` be ``admin`` or ``user`` and
    ``days`` lie in 1..3650 without outliving the CA. Existing files are refused with
    :class:`PkiExists` unless ``force`` is true.
    """
    validate_client_name(name)
    checked_role = role if isinstance(role, Role) else parse_role(role)
    _validate_days(days)
    base = Path(directory)
    cert_path, key_path = base / f"{name}.pem", base / f"{name}-key.pem"
    pki = PkiPaths.in_dir(base)
    if not (pki.client_ca.exists() and pki.client_ca_key.exists()):
        raise PkiMissing(
            f"no client CA in {base} (client-ca.pem and client-ca-key.pem): "
            f"run 'jobworker certs init {base}' first"
        )
    ca = load_cert_and_key(pki.client_ca, pki.client_ca_key)
    if datetime.now(UTC) + timedelta(days=days) > ca.cert.not_valid_after_utc:
        raise InvalidArgument(
            f"{days} days would outlive the client CA, which expires "
            f"{ca.cert.not_valid_after_utc:%Y-%m-%d}"
        )
    if not force:
        _refuse_existing((cert_path, key_path), f"a certificate for {name!r} in {base}")
    pair = create_client_cert(ca, name, checked_role, days=days)
    _write_pair(cert_path, key_path, pair, overwrite=force)
    return ClientPaths(cert=cert_path, key=key_path)
