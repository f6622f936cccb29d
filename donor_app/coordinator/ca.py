"""The coordinator's certificate authority: its key and self-signed certificate, and
the certificates it signs (donors' client certificates, the server's, the admin's).

The CA is made on the coordinator's first start and kept in its TLS directory
(``ca.key`` 0600, ``ca.pem``); `CertificateAuthority.load_or_create` reads or creates
those two files, and refuses (`EnrollmentError`) rather than replace them, because a new
CA would lock every enrolled donor out. Signing is pure apart from the randomness of
keys and serials; times are passed in as ``now``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from donor_app.atomic_file import write_atomic
from donor_app.coordinator.identity import ADMIN_CN, MAX_COMMON_NAME, certificate_sha256
from donor_app.coordinator.pki import (
    PEM,
    EnrollmentError,
    ensure_private_dir,
    private_key_pem,
    public_key_der,
    read_certificate,
    read_private_key,
    tighten_mode,
    utc_seconds,
)

logger = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"

CA_VALIDITY = timedelta(days=3650)
# not_before is backdated so that a peer whose clock is a little behind ours does not
# reject a certificate issued a moment ago as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)

# A PKCS#10 request for a P-384 or RSA-8192 key is a few KiB; anything much larger is
# not a CSR we would sign and is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
# Verifying a signature by a huge RSA key costs the coordinator CPU for nothing.
MAX_RSA_BITS = 8192
MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class CsrRejected(Exception):
    """A donor's certificate signing request is refused; `reason` says why (for the
    caller: the Enroll servicer answers INVALID_ARGUMENT naming csr_pem)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A client certificate signed by the CA: PEM, sha256 of its DER, expiry (UTC)."""

    cert_pem: bytes
    sha256: str
    not_after: datetime


class CertificateAuthority:
    """The coordinator's CA: an EC P-256 key and its self-signed certificate.

    Build it with `load_or_create` (files) or `generate` (memory only, for tests and
    tools). Signing methods are pure apart from the randomness of keys and serials.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
            raise ValueError("the CA key does not match the CA certificate")
        self._key = key
        self._cert = cert
        self._cert_pem = cert.public_bytes(PEM)
        self._fingerprint = certificate_sha256(cert)

    @classmethod
    def generate(cls, now: datetime) -> CertificateAuthority:
        """A new CA valid for `CA_VALIDITY` from `now`, in memory only."""
        now = utc_seconds(now, "now")
        key = ec.generate_private_key(ec.SECP256R1())
        # A random suffix keeps the subjects of different coordinators' CAs apart, which
        # makes "signed by the wrong CA" errors readable.
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"donor_app coordinator CA {secrets.token_hex(4)}"
                )
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, directory: Path, now: datetime) -> CertificateAuthority:
        """The CA in `directory` (``ca.key``, ``ca.pem``), created there if neither file
        exists. The directory is created with mode 0700, the key written 0600.

        Raises `EnrollmentError` naming the file when one file exists without the other,
        a file cannot be parsed, or the key does not match the certificate.
        """
        key_file = directory / CA_KEY_FILE
        cert_file = directory / CA_CERT_FILE
        ensure_private_dir(directory)
        have_key, have_cert = key_file.exists(), cert_file.exists()
        if not have_key and not have_cert:
            ca = cls.generate(now)
            # Key first: a crash between the two writes leaves a key without a
            # certificate, which the next start reports instead of replacing.
            write_atomic(key_file, ca._key_pem(), 0o600)
            write_atomic(cert_file, ca.cert_pem, 0o644)
            logger.info(
                "created the coordinator CA in %s (sha256 %s)", directory, ca.fingerprint_sha256
            )
            return ca
        if not have_cert:
            raise EnrollmentError(
                f"{cert_file}: missing while {key_file} exists; restore it from a backup, "
                f"or remove {key_file} to create a new CA (every donor must then enroll again)"
            )
        if not have_key:
            raise EnrollmentError(
                f"{key_file}: missing while {cert_file} exists; restore it from a backup, "
                f"or remove {cert_file} to create a new CA (every donor must then enroll again)"
            )
        tighten_mode(key_file, 0o600)
        key = read_private_key(key_file)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollmentError(f"{key_file}: not an EC private key")
        cert = read_certificate(cert_file)
        try:
            ca = cls(key, cert)
        except ValueError:
            raise EnrollmentError(
                f"{cert_file}: does not belong to the key in {key_file}"
            ) from None
        if cert.not_valid_after_utc <= utc_seconds(now, "now"):
            raise EnrollmentError(
                f"{cert_file}: the CA expired on {cert.not_valid_after_utc.isoformat()}"
            )
        return ca

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (PEM): what donors and admins trust."""
        return self._cert_pem

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate, parsed."""
        return self._cert

    @property
    def fingerprint_sha256(self) -> str:
        """sha256 of the CA certificate's DER, lowercase hex (to compare out of band)."""
        return self._fingerprint

    @property
    def not_after(self) -> datetime:
        """When the CA certificate expires (aware UTC); no certificate it signs outlives it."""
        return self._cert.not_valid_after_utc

    def sign_client(
        self, csr_pem: bytes, common_name: str, now: datetime, valid_for: timedelta
    ) -> IssuedCertificate:
        """A client certificate for the CSR's public key with CN `common_name`.

        Only the CSR's public key is used: its subject and extensions are ignored and
        the certificate gets CN `common_name`, KeyUsage digitalSignature, ExtendedKeyUsage
        clientAuth and BasicConstraints CA=false. Raises `CsrRejected` for data that is
        not a PEM CSR, a bad self-signature, or a key other than EC P-256/P-384 or
        RSA 2048-8192 bits; `ValueError` for a bad `common_name` or `valid_for`.
        """
        public_key = _csr_public_key(csr_pem)
        cert = self._issue(
            public_key=public_key,
            common_name=common_name,
            now=now,
            valid_for=valid_for,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return IssuedCertificate(
            cert_pem=cert.public_bytes(PEM),
            sha256=certificate_sha256(cert),
            not_after=cert.not_valid_after_utc,
        )

    def issue_server(
        self, hostnames: Sequence[str], now: datetime, valid_for: timedelta
    ) -> tuple[bytes, bytes]:
        """A new server key and certificate (PEM) for `hostnames`: each is a DNS name or
        an IP address and becomes a subjectAltName; ExtendedKeyUsage serverAuth."""
        names = san_entries(hostnames)
        key = ec.generate_private_key(ec.SECP256R1())
        first = hostnames[0].strip()
        common_name = first if len(first) <= MAX_COMMON_NAME else "donor_app coordinator"
        cert = self._issue(
            public_key=key.public_key(),
            common_name=common_name,
            now=now,
            valid_for=valid_for,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            names=names,
        )
        return private_key_pem(key), cert.public_bytes(PEM)

    def issue_admin(self, now: datetime, valid_for: timedelta) -> tuple[bytes, bytes]:
        """A new admin key and client certificate (PEM), CN `ADMIN_CN`."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            public_key=key.public_key(),
            common_name=ADMIN_CN,
            now=now,
            valid_for=valid_for,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return private_key_pem(key), cert.public_bytes(PEM)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether `cert` carries this CA's signature."""
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _issue(
        self,
        *,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        now: datetime,
        valid_for: timedelta,
        usage: x509.ObjectIdentifier,
        names: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        now = utc_seconds(now, "now")
        if valid_for <= timedelta(0):
            raise ValueError(f"valid_for: must be positive, got {valid_for}")
        if not 1 <= len(common_name) <= MAX_COMMON_NAME:
            raise ValueError(f"common_name: must be 1 to {MAX_COMMON_NAME} characters")
        # A certificate cannot usefully outlive the CA that signed it.
        not_after = min(now + valid_for, self._cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
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
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def _key_pem(self) -> bytes:
        return private_key_pem(self._key)


def _csr_public_key(csr_pem: bytes) -> CertificatePublicKeyTypes:
    if not isinstance(csr_pem, bytes) or not csr_pem.strip():
        raise CsrRejected("empty")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRejected(f"larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRejected("not a PEM certificate signing request") from None
    # The key is checked before the signature so that an oversize RSA key costs nothing.
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _ALLOWED_CURVES):
            raise CsrRejected(
                f"EC curve {public_key.curve.name} is not accepted (use P-256 or P-384)"
            )
    elif isinstance(public_key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            raise CsrRejected(
                f"RSA key of {public_key.key_size} bits is not accepted "
                f"({MIN_RSA_BITS} to {MAX_RSA_BITS} bits)"
            )
    else:
        raise CsrRejected(
            f"{type(public_key).__name__} keys are not accepted (use EC P-256/P-384 or RSA)"
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrRejected("its signature does not match its public key")
    return public_key


def san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltName entries for `hostnames`: IP addresses as such, the rest as DNS
    names (lowercased); duplicates dropped. `ValueError` naming a bad one."""
    if isinstance(hostnames, str) or not hostnames:
        raise ValueError("hostnames: at least one DNS name or IP address is needed")
    entries: list[x509.GeneralName] = []
    for raw in hostnames:
        name = raw.strip()
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            labels = name.lower().removesuffix(".").split(".")
            if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
                raise ValueError(
                    f"hostnames: {raw!r} is neither a DNS name nor an IP address"
                ) from None
            entry = x509.DNSName(".".join(labels))
        if entry not in entries:
            entries.append(entry)
    return entries
