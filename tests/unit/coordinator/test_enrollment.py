"""The coordinator's CA, TLS files, enrollment tokens and caller identities."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.ca import CertificateAuthority, CsrRejected
from donor_app.coordinator.identity import (
    ADMIN_CN,
    Identity,
    donor_common_name,
    identity_from_auth_context,
)
from donor_app.coordinator.pki import EnrollmentError
from donor_app.coordinator.tls_files import prepare_tls
from donor_app.coordinator.tokens import new_token, parse_token, token_refusal

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
NOW_S = NOW.replace(microsecond=0)
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(NOW)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def csr_for(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    builder: x509.CertificateSigningRequestBuilder | None = None,
) -> bytes:
    builder = builder or x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


# --- the CA on disk ----------------------------------------------------------------------


def test_load_or_create_creates_private_files_then_loads_the_same_ca(tmp_path: Path) -> None:
    directory = tmp_path / "tls" / "ca"
    first = CertificateAuthority.load_or_create(directory, NOW)

    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert (directory / "ca.pem").read_bytes() == first.cert_pem
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]

    second = CertificateAuthority.load_or_create(directory, NOW + DAY)
    assert second.cert_pem == first.cert_pem
    assert second.fingerprint_sha256 == first.fingerprint_sha256
    der = cert_of(first.cert_pem).public_bytes(serialization.Encoding.DER)
    assert first.fingerprint_sha256 == hashlib.sha256(der).hexdigest()


def test_the_ca_certificate_is_a_ca(ca: CertificateAuthority) -> None:
    cert = cert_of(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize("name", ["ca.key", "ca.pem"])
def test_a_corrupt_ca_file_is_an_error_naming_it_and_is_kept(tmp_path: Path, name: str) -> None:
    CertificateAuthority.load_or_create(tmp_path, NOW)
    (tmp_path / name).write_bytes(b"-----BEGIN garbage-----\n")

    with pytest.raises(EnrollmentError, match=re.escape(str(tmp_path / name))):
        CertificateAuthority.load_or_create(tmp_path, NOW)
    assert (tmp_path / name).read_bytes() == b"-----BEGIN garbage-----\n"


@pytest.mark.parametrize(("missing", "named"), [("ca.pem", "ca.pem"), ("ca.key", "ca.key")])
def test_half_a_ca_is_an_error_not_a_new_ca(tmp_path: Path, missing: str, named: str) -> None:
    CertificateAuthority.load_or_create(tmp_path, NOW)
    (tmp_path / missing).unlink()

    with pytest.raises(EnrollmentError, match=re.escape(str(tmp_path / named)) + ": missing"):
        CertificateAuthority.load_or_create(tmp_path, NOW)
    assert not (tmp_path / missing).exists()


def test_a_ca_certificate_of_another_key_is_an_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, NOW)
    other = CertificateAuthority.generate(NOW)
    (tmp_path / "ca.pem").write_bytes(other.cert_pem)

    with pytest.raises(EnrollmentError, match="ca.pem: does not belong to the key"):
        CertificateAuthority.load_or_create(tmp_path, NOW)


def test_a_loose_key_mode_is_tightened(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, NOW)
    (tmp_path / "ca.key").chmod(0o644)
    CertificateAuthority.load_or_create(tmp_path, NOW)
    assert mode(tmp_path / "ca.key") == 0o600


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="now: must be a timezone-aware"):
        CertificateAuthority.generate(datetime(2025, 1, 1))


# --- signing CSRs ------------------------------------------------------------------------


def test_sign_client_issues_a_client_certificate_for_the_csr_key(
    ca: CertificateAuthority,
) -> None:
    key_pem, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, "donor:d1", NOW, 90 * DAY)

    cert = cert_of(issued.cert_pem)
    cert.verify_directly_issued_by(cert_of(ca.cert_pem))
    assert cert.subject.rfc4514_string() == "CN=donor:d1"
    assert issued.not_after == NOW_S + 90 * DAY == cert.not_valid_after_utc
    assert cert.not_valid_before_utc <= NOW
    assert (
        issued.sha256 == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == key.public_key().public_bytes(serialization.Encoding.DER, spki)
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_sign_client_ignores_the_csr_subject_and_extensions(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_CN)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
    )
    cert = cert_of(ca.sign_client(csr_for(key, builder), "donor:d2", NOW, DAY).cert_pem)

    assert cert.subject.rfc4514_string() == "CN=donor:d2"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_sign_client_accepts_rsa_2048(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = cert_of(ca.sign_client(csr_for(key), "donor:r", NOW, DAY).cert_pem)
    cert.verify_directly_issued_by(cert_of(ca.cert_pem))


def test_a_certificate_never_outlives_the_ca(ca: CertificateAuthority) -> None:
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, "donor:d", NOW, 100 * 365 * DAY)
    assert issued.not_after == ca.not_after


def _tampered_csr() -> bytes:
    _, csr_pem = new_key_and_csr()
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    # The signature is the last field: flipping a bit in it keeps the DER parsable.
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make_csr", "reason"),
    [
        (lambda: b"", "empty"),
        (lambda: b"not a csr at all", "not a PEM certificate signing request"),
        (
            lambda: (
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "not a PEM certificate signing request",
        ),
        (lambda: b"x" * 20_000, "larger than"),
        (_tampered_csr, "signature does not match"),
        (lambda: csr_for(ed25519.Ed25519PrivateKey.generate()), "Ed25519PublicKey keys are not"),
        (
            lambda: csr_for(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "RSA key of 1024 bits",
        ),
        (lambda: csr_for(ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
        (lambda: csr_for(ec.generate_private_key(ec.SECP521R1())), "secp521r1"),
    ],
    ids=[
        "empty",
        "text",
        "bad-der",
        "oversize",
        "bad-signature",
        "ed25519",
        "rsa1024",
        "secp256k1",
        "p521",
    ],
)
def test_sign_client_rejects(ca: CertificateAuthority, make_csr: object, reason: str) -> None:
    csr_pem = make_csr()  # type: ignore[operator]
    with pytest.raises(CsrRejected, match=re.escape(reason)) as caught:
        ca.sign_client(csr_pem, "donor:x", NOW, DAY)
    assert reason in caught.value.reason


def test_sign_client_checks_its_own_arguments(ca: CertificateAuthority) -> None:
    _, csr_pem = new_key_and_csr()
    with pytest.raises(ValueError, match="valid_for"):
        ca.sign_client(csr_pem, "donor:x", NOW, timedelta(0))
    with pytest.raises(ValueError, match="common_name"):
        ca.sign_client(csr_pem, "x" * 65, NOW, DAY)


def test_issue_server_puts_dns_names_and_ip_addresses_in_the_san(
    ca: CertificateAuthority,
) -> None:
    key_pem, cert_pem = ca.issue_server(
        ["Coord.Example", "127.0.0.1", "::1", "localhost"], NOW, 30 * DAY
    )
    cert = cert_of(cert_pem)
    cert.verify_directly_issued_by(cert_of(ca.cert_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert serialization.load_pem_private_key(key_pem, password=None)


@pytest.mark.parametrize("hostnames", [[], ["bad name"], ["a..b"], ["-x.example"]])
def test_issue_server_refuses_bad_hostnames(ca: CertificateAuthority, hostnames: list[str]) -> None:
    with pytest.raises(ValueError, match="hostnames"):
        ca.issue_server(hostnames, NOW, DAY)


def test_issue_admin(ca: CertificateAuthority) -> None:
    key_pem, cert_pem = ca.issue_admin(NOW, DAY)
    cert = cert_of(cert_pem)
    cert.verify_directly_issued_by(cert_of(ca.cert_pem))
    assert cert.subject.rfc4514_string() == "CN=admin"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert serialization.load_pem_private_key(key_pem, password=None)


# --- prepare_tls -------------------------------------------------------------------------


def test_prepare_tls_first_start_writes_everything(tmp_path: Path) -> None:
    tls = prepare_tls(tmp_path / "tls", ["localhost", "127.0.0.1"], NOW)

    assert mode(tmp_path / "tls") == 0o700
    for path, expected in [
        (tls.server_key_file, 0o600),
        (tls.admin_key_file, 0o600),
        (tls.admin_cert_file, 0o600),
        (tmp_path / "tls" / "ca.key", 0o600),
    ]:
        assert mode(path) == expected, path
    assert tls.ca_cert_file.read_bytes() == tls.ca_pem == tls.ca.cert_pem
    assert tls.server_key_file.read_bytes() == tls.server_key_pem
    assert tls.server_cert_file.read_bytes() == tls.server_cert_pem
    assert tls.admin_key_file.read_bytes() == tls.admin_key_pem
    assert tls.admin_cert_file.read_bytes() == tls.admin_cert_pem
    ca = cert_of(tls.ca_pem)
    cert_of(tls.server_cert_pem).verify_directly_issued_by(ca)
    admin = cert_of(tls.admin_cert_pem)
    admin.verify_directly_issued_by(ca)
    assert admin.subject.rfc4514_string() == "CN=admin"
    assert "PRIVATE KEY" not in repr(tls)


def test_prepare_tls_keeps_good_files(tmp_path: Path) -> None:
    first = prepare_tls(tmp_path, ["localhost"], NOW)
    again = prepare_tls(tmp_path, ["LOCALHOST"], NOW + 100 * DAY)
    assert again.server_cert_pem == first.server_cert_pem
    assert again.admin_cert_pem == first.admin_cert_pem
    assert again.ca_pem == first.ca_pem


def test_prepare_tls_reissues_the_server_certificate_when_hostnames_change(
    tmp_path: Path,
) -> None:
    first = prepare_tls(tmp_path, ["localhost"], NOW)
    again = prepare_tls(tmp_path, ["localhost", "coord.example"], NOW)
    assert again.server_cert_pem != first.server_cert_pem
    assert again.server_key_pem != first.server_key_pem
    assert again.admin_cert_pem == first.admin_cert_pem
    san = cert_of(again.server_cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "coord.example"]


def test_prepare_tls_renews_certificates_near_expiry(tmp_path: Path) -> None:
    first = prepare_tls(tmp_path, ["localhost"], NOW)
    server_expiry = cert_of(first.server_cert_pem).not_valid_after_utc
    admin_expiry = cert_of(first.admin_cert_pem).not_valid_after_utc

    near_server = prepare_tls(tmp_path, ["localhost"], server_expiry - 29 * DAY)
    assert near_server.server_cert_pem != first.server_cert_pem
    assert near_server.admin_cert_pem == first.admin_cert_pem

    near_admin = prepare_tls(tmp_path, ["localhost"], admin_expiry - 10 * DAY)
    assert near_admin.admin_cert_pem != first.admin_cert_pem
    assert near_admin.ca_pem == first.ca_pem


def test_prepare_tls_replaces_a_corrupt_server_certificate(tmp_path: Path) -> None:
    first = prepare_tls(tmp_path, ["localhost"], NOW)
    first.server_cert_file.write_bytes(b"junk")
    again = prepare_tls(tmp_path, ["localhost"], NOW)
    cert_of(again.server_cert_pem).verify_directly_issued_by(cert_of(first.ca_pem))


def test_prepare_tls_reissues_after_a_new_ca(tmp_path: Path) -> None:
    first = prepare_tls(tmp_path, ["localhost"], NOW)
    (tmp_path / "ca.key").unlink()
    (tmp_path / "ca.pem").unlink()
    again = prepare_tls(tmp_path, ["localhost"], NOW)
    assert again.ca_pem != first.ca_pem
    ca = cert_of(again.ca_pem)
    cert_of(again.server_cert_pem).verify_directly_issued_by(ca)
    cert_of(again.admin_cert_pem).verify_directly_issued_by(ca)


def test_prepare_tls_propagates_a_corrupt_ca(tmp_path: Path) -> None:
    prepare_tls(tmp_path, ["localhost"], NOW)
    (tmp_path / "ca.key").write_bytes(b"")
    with pytest.raises(EnrollmentError, match="ca.key"):
        prepare_tls(tmp_path, ["localhost"], NOW)


# --- tokens ------------------------------------------------------------------------------


def test_new_token_format_and_record() -> None:
    token, record = new_token(NOW, timedelta(hours=1), 1, "laptop")

    match = re.fullmatch(r"dtk_([0-9a-f]{16})_([A-Za-z0-9_-]{43,})", token)
    assert match is not None
    token_id, secret = match.groups()
    assert record.token_id == token_id
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(record)
    assert record.created_at == NOW_S
    assert record.expires_at == NOW_S + timedelta(hours=1)
    assert record.uses_left == 1
    assert record.note == "laptop"
    assert parse_token(token) == (record.token_id, record.secret_sha256)
    assert parse_token(f"  {token}\n") == (record.token_id, record.secret_sha256)


def test_tokens_are_unique() -> None:
    tokens = {new_token(NOW, timedelta(hours=1), 1, "")[0] for _ in range(200)}
    assert len(tokens) == 200


@pytest.mark.parametrize(
    ("ttl", "uses", "note", "field"),
    [
        (timedelta(seconds=59), 1, "", "ttl"),
        (timedelta(days=30, seconds=1), 1, "", "ttl"),
        (timedelta(hours=1), 0, "", "uses"),
        (timedelta(hours=1), 100_001, "", "uses"),
        (timedelta(hours=1), True, "", "uses"),
        (timedelta(hours=1), 1, "n" * 257, "note"),
    ],
)
def test_new_token_validates(ttl: timedelta, uses: int, note: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        new_token(NOW, ttl, uses, note)


def test_new_token_limits_are_inclusive() -> None:
    assert new_token(NOW, timedelta(minutes=1), 100_000, "n" * 256)[1].uses_left == 100_000
    assert new_token(NOW, timedelta(days=30), 1, "")[1].expires_at == NOW_S + timedelta(days=30)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dtk_",
        "abc_0123456789abcdef_" + "s" * 43,
        "dtk_0123456789ABCDEF_" + "s" * 43,
        "dtk_0123456789abcde_" + "s" * 43,
        "dtk_0123456789abcdef_" + "s" * 42,
        "dtk_0123456789abcdef_" + "s" * 129,
        "dtk_0123456789abcdef_" + "s" * 42 + "!",
        "dtk_0123456789abcdef " + "s" * 43,
    ],
)
def test_parse_token_refuses_malformed_tokens_without_echoing_them(text: str) -> None:
    with pytest.raises(ValueError, match="^token: malformed") as caught:
        parse_token(text)
    assert "sss" not in str(caught.value)


def test_token_refusal() -> None:
    token, record = new_token(NOW, timedelta(hours=1), 2, "")
    _, secret_sha = parse_token(token)
    assert token_refusal(record, secret_sha, NOW) is None
    assert token_refusal(None, secret_sha, NOW) == "token: unknown or invalid"
    assert token_refusal(record, "0" * 64, NOW) == "token: unknown or invalid"
    assert token_refusal(record, secret_sha, NOW + timedelta(hours=1)) == "token: expired"
    used = dataclasses.replace(record, uses_left=0)
    assert token_refusal(used, secret_sha, NOW) == "token: already used"


# --- identity ----------------------------------------------------------------------------


def _auth_context(cert_pem: bytes, common_name: bytes) -> dict[str, list[bytes]]:
    # What grpc's auth_context() holds on the mTLS port.
    return {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [common_name],
        "x509_pem_cert": [cert_pem],
    }


def _sha256(cert_pem: bytes) -> str:
    return hashlib.sha256(cert_of(cert_pem).public_bytes(serialization.Encoding.DER)).hexdigest()


def test_identity_of_a_donor(ca: CertificateAuthority) -> None:
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, donor_common_name("d-42"), NOW, DAY)

    identity = identity_from_auth_context(_auth_context(issued.cert_pem, b"donor:d-42"))

    assert identity == Identity(role="donor", donor_id="d-42", cert_sha256=issued.sha256)


def test_identity_of_the_admin(ca: CertificateAuthority) -> None:
    _, cert_pem = ca.issue_admin(NOW, DAY)
    identity = identity_from_auth_context(_auth_context(cert_pem + b"\0", b"admin"))
    assert identity == Identity(role="admin", donor_id=None, cert_sha256=_sha256(cert_pem))


def test_no_certificate_no_identity() -> None:
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context({"transport_security_type": [b"ssl"]}) is None
    assert identity_from_auth_context({"x509_pem_cert": []}) is None
    assert identity_from_auth_context({"x509_pem_cert": [b"junk"]}) is None


@pytest.mark.parametrize("common_name", ["donor:", "server", "donor:a b", "Admin"])
def test_an_unknown_common_name_has_no_identity(ca: CertificateAuthority, common_name: str) -> None:
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, common_name, NOW, DAY)
    ctx = _auth_context(issued.cert_pem, common_name.encode())
    assert identity_from_auth_context(ctx) is None


def test_donor_common_name_validates() -> None:
    assert donor_common_name("abc") == "donor:abc"
    for bad in ["", "a b", "a/b", "x" * 59]:
        with pytest.raises(ValueError, match="donor_id"):
            donor_common_name(bad)
    assert donor_common_name("x" * 58) == "donor:" + "x" * 58
