"""The PKI: what init_pki and issue_client write, how, and what they refuse; the certs CLI."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner, Result

from jobworker.auth.identity import identity_from_der
from jobworker.auth.roles import Role
from jobworker.certs import (
    CA_DAYS,
    CLIENT_DAYS,
    SERVER_DAYS,
    PkiExists,
    PkiMissing,
    PkiPaths,
    create_ca,
    create_client_cert,
    init_pki,
    issue_client,
    validate_client_name,
)
from jobworker.cli.certs import app
from jobworker.errors import InvalidArgument

DAY = timedelta(days=1)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so file modes come from the code alone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def pki_dir(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki", ["worker.example.com", "10.1.2.3"])


# --- init_pki ---------------------------------------------------------------------------


def test_init_writes_every_file(pki_dir: PkiPaths) -> None:
    names = sorted(path.name for path in pki_dir.directory.iterdir())
    assert names == sorted(
        [
            "server-ca.pem",
            "server-ca-key.pem",
            "client-ca.pem",
            "client-ca-key.pem",
            "server.pem",
            "server-key.pem",
            "admin.pem",
            "admin-key.pem",
        ]
    )
    assert pki_dir.exists()


@pytest.mark.usefixtures("umask_zero")
def test_keys_are_0600_and_certs_0644(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    issued = issue_client(paths.directory, "bob", "user")
    keys = [p for p in paths.files() if p.name.endswith("-key.pem")] + [issued.key]
    certs = [p for p in paths.files() if not p.name.endswith("-key.pem")] + [issued.cert]
    assert len(keys) == 5
    assert len(certs) == 5
    assert {p.name: mode(p) for p in keys} == {p.name: 0o600 for p in keys}
    assert {p.name: mode(p) for p in certs} == {p.name: 0o644 for p in certs}
    assert mode(paths.directory) == 0o700


def test_a_restrictive_umask_still_gives_0600_keys(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        paths = init_pki(tmp_path / "pki")
    finally:
        os.umask(old)
    assert mode(paths.admin_key) == 0o600
    assert mode(paths.admin_cert) == 0o644


def test_init_refuses_to_overwrite(pki_dir: PkiPaths) -> None:
    before = {p: p.read_bytes() for p in pki_dir.files()}
    with pytest.raises(PkiExists, match="already exists"):
        init_pki(pki_dir.directory)
    assert {p: p.read_bytes() for p in pki_dir.files()} == before


def test_init_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    (tmp_path / "client-ca-key.pem").write_bytes(b"precious")
    with pytest.raises(PkiExists, match=r"client-ca-key\.pem"):
        init_pki(tmp_path)
    assert (tmp_path / "client-ca-key.pem").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-ca-key.pem"]


def test_init_force_replaces_everything(pki_dir: PkiPaths) -> None:
    before = {p: p.read_bytes() for p in pki_dir.files()}
    init_pki(pki_dir.directory, force=True)
    after = {p: p.read_bytes() for p in pki_dir.files()}
    assert all(after[p] != before[p] for p in pki_dir.files())
    assert mode(pki_dir.server_ca_key) == 0o600


def test_no_temporary_files_are_left(pki_dir: PkiPaths) -> None:
    issue_client(pki_dir.directory, "bob", "user")
    with pytest.raises(PkiExists):
        issue_client(pki_dir.directory, "bob", "user")
    assert not [p.name for p in pki_dir.directory.iterdir() if p.name.startswith(".")]


def test_init_rejects_a_bad_host_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="invalid host"):
        init_pki(tmp_path / "pki", ["bad host"])
    assert not (tmp_path / "pki").exists()


# --- what the certificates say ----------------------------------------------------------


def test_cas_are_separate_self_signed_p256_cas(pki_dir: PkiPaths) -> None:
    server_ca, client_ca = load(pki_dir.server_ca), load(pki_dir.client_ca)
    assert server_ca.public_key() != client_ca.public_key()
    assert server_ca.subject != client_ca.subject
    for ca in (server_ca, client_ca):
        assert ca.issuer == ca.subject
        ca.verify_directly_issued_by(ca)
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca
        assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        key = ca.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
        assert abs(lifetime(ca) - timedelta(days=CA_DAYS)) < DAY


def test_server_certificate(pki_dir: PkiPaths) -> None:
    cert = load(pki_dir.server_cert)
    cert.verify_directly_issued_by(load(pki_dir.server_ca))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["worker.example.com", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert abs(lifetime(cert) - timedelta(days=SERVER_DAYS)) < DAY


def test_admin_certificate(pki_dir: PkiPaths) -> None:
    cert = load(pki_dir.admin_cert)
    cert.verify_directly_issued_by(load(pki_dir.client_ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    identity = identity_from_der(cert.public_bytes(Encoding.DER))
    assert (identity.name, identity.role) == ("admin", Role.ADMIN)
    role = next(e for e in cert.extensions if isinstance(e.value, x509.UnrecognizedExtension))
    assert not role.critical
    assert abs(lifetime(cert) - timedelta(days=CLIENT_DAYS)) < DAY


def test_duplicate_hosts_appear_once(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, ["localhost", "LOCALHOST.", "::1"])
    sans = load(paths.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert len(sans.value.get_values_for_type(x509.IPAddress)) == 2


def test_validity_can_be_set_for_expired_test_certificates() -> None:
    ca = create_ca("test CA")
    now = datetime.now(UTC)
    pair = create_client_cert(ca, "old", Role.USER, not_before=now - 10 * DAY, not_after=now - DAY)
    assert pair.cert.not_valid_after_utc < now
    with pytest.raises(InvalidArgument, match="end after it starts"):
        create_client_cert(ca, "x", Role.USER, not_before=now, not_after=now - DAY)


# --- issue_client -----------------------------------------------------------------------


def test_issue_client(pki_dir: PkiPaths) -> None:
    paths = issue_client(pki_dir.directory, "bob", "user", days=30)
    assert paths.cert == pki_dir.directory / "bob.pem"
    assert paths.key == pki_dir.directory / "bob-key.pem"
    cert = load(paths.cert)
    cert.verify_directly_issued_by(load(pki_dir.client_ca))
    identity = identity_from_der(cert.public_bytes(Encoding.DER))
    assert (identity.name, identity.role) == ("bob", Role.USER)
    assert abs(lifetime(cert) - timedelta(days=30)) < DAY


def test_issue_refuses_to_overwrite_unless_forced(pki_dir: PkiPaths) -> None:
    first = issue_client(pki_dir.directory, "bob", Role.USER)
    old = first.cert.read_bytes()
    with pytest.raises(PkiExists, match="bob"):
        issue_client(pki_dir.directory, "bob", Role.ADMIN)
    assert first.cert.read_bytes() == old
    issue_client(pki_dir.directory, "bob", Role.ADMIN, force=True)
    assert first.cert.read_bytes() != old


def test_issue_needs_a_client_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiMissing, match="certs init"):
        issue_client(tmp_path, "bob", "user")
    assert list(tmp_path.iterdir()) == []


def test_issue_refuses_a_key_that_does_not_match_the_ca(pki_dir: PkiPaths) -> None:
    pki_dir.client_ca_key.write_bytes(pki_dir.server_ca_key.read_bytes())
    with pytest.raises(PkiMissing, match="not the key"):
        issue_client(pki_dir.directory, "bob", "user")


@pytest.mark.parametrize("name", ["bob", "Bob_2", "a", "x" * 64, "svc.ci-runner", "0day", "admin"])
def test_good_client_names(name: str) -> None:
    assert validate_client_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden",
        "-flag",
        "x" * 65,
        "a/b",
        "../up",
        "sp ace",
        "nul\x00",
        "é",
        "server",
        "server-ca",
        "client-ca",
        "bob-key",
    ],
)
def test_bad_client_names(pki_dir: PkiPaths, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid client name"):
        issue_client(pki_dir.directory, name, "user")
    assert sorted(p.name for p in pki_dir.directory.iterdir()) == sorted(
        p.name for p in pki_dir.files()
    )


@pytest.mark.parametrize("role", ["root", "Admin", "", "user "])
def test_bad_roles(pki_dir: PkiPaths, role: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown role"):
        issue_client(pki_dir.directory, "bob", role)


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_bad_days(pki_dir: PkiPaths, days: int) -> None:
    with pytest.raises(InvalidArgument, match="days"):
        issue_client(pki_dir.directory, "bob", "user", days)


def test_a_client_cannot_outlive_its_ca(tmp_path: Path) -> None:
    paths = PkiPaths.in_dir(tmp_path)
    ca = create_ca("short CA", days=10)
    paths.client_ca.write_bytes(ca.cert_pem())
    paths.client_ca_key.write_bytes(ca.key_pem())
    with pytest.raises(InvalidArgument, match="outlive"):
        issue_client(tmp_path, "bob", "user", days=30)
    assert issue_client(tmp_path, "bob", "user", days=5).cert.exists()


# --- the CLI ----------------------------------------------------------------------------


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "pki"
    result = runner.invoke(app, ["init", str(target), "--host", "w1.example", "--host", "::2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"wrote {p}" for p in PkiPaths.in_dir(target).files()]
    sans = load(target / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "w1.example" in sans.value.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("::2") in sans.value.get_values_for_type(x509.IPAddress)

    result = runner.invoke(
        app, ["issue", str(target), "--name", "carol", "--role", "user", "--days", "7"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"wrote {target / 'carol.pem'}",
        f"wrote {target / 'carol-key.pem'}",
    ]
    cert = load(target / "carol.pem")
    assert abs(lifetime(cert) - timedelta(days=7)) < DAY
    assert mode(target / "carol-key.pem") == 0o600


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_cli_init_refuses_an_existing_pki(pki_dir: PkiPaths) -> None:
    runner = CliRunner()
    line = _one_line_error(runner.invoke(app, ["init", str(pki_dir.directory)]))
    assert "already exists" in line
    assert "--force" in line
    result = runner.invoke(app, ["init", str(pki_dir.directory), "--force"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", ".bob", "--role", "user"], "invalid client name"),
        (["--name", "admin", "--role", "user"], "already exists"),
    ],
)
def test_cli_issue_errors(pki_dir: PkiPaths, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["issue", str(pki_dir.directory), *args])
    assert message in _one_line_error(result)


def test_cli_issue_without_a_pki(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["issue", str(tmp_path), "--name", "bob", "--role", "user"])
    assert "certs init" in _one_line_error(result)


def test_cli_rejects_an_unknown_role(pki_dir: PkiPaths) -> None:
    result = CliRunner().invoke(
        app, ["issue", str(pki_dir.directory), "--name", "bob", "--role", "root"]
    )
    assert result.exit_code != 0
    assert not (pki_dir.directory / "bob.pem").exists()
