"""Enrollment and identity: the coordinator's CA, its TLS files, tokens and callers.

The coordinator creates a CA on first start (docs/design.md, "Security"); donors enroll
on a server-TLS-only port with a token and a CSR and get a client certificate (CN
``donor:<donor_id>``) signed by that CA; the main port requires such a certificate
(mTLS). The admin credential is a client certificate with CN ``admin`` written next to
the CA at first start.

Everything here is a pure function of its inputs (times are passed in as ``now``)
except the file helpers `CertificateAuthority.load_or_create` and `prepare_tls`, which
read and write the coordinator's TLS directory. Nothing here imports grpc: the servicers
turn `CoordinatorTls` into grpc credentials and `context.auth_context()` into an
`Identity` through `identity_from_auth_context`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from donor_app.domain.records import TokenRecord

logger = logging.getLogger(__name__)

ADMIN_CN = "admin"
DONOR_CN_PREFIX = "donor:"

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
SERVER_KEY_FILE = "server.key"
SERVER_CERT_FILE = "server.pem"
ADMIN_KEY_FILE = "admin.key"
ADMIN_CERT_FILE = "admin.pem"

CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
ADMIN_VALIDITY = timedelta(days=730)
# prepare_tls reissues the server and admin certificates this long before they expire,
# so a coordinator restarted now and then never serves an expired certificate.
RENEW_BEFORE = timedelta(days=30)
# not_before is backdated so that a peer whose clock is a little behind ours does not
# reject a certificate issued a moment ago as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)

TOKEN_PREFIX = "dtk"
MIN_TOKEN_TTL = timedelta(minutes=1)
MAX_TOKEN_TTL = timedelta(days=30)
MAX_TOKEN_USES = 100_000
MAX_TOKEN_NOTE = 256
_TOKEN_ID_BYTES = 8
_TOKEN_SECRET_BYTES = 32

# A PKCS#10 request for a P-384 or RSA-8192 key is a few KiB; anything much larger is
# not a CSR we would sign and is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
# RFC 5280's upper bound for a common name.
MAX_COMMON_NAME = 64
# Verifying a signature by a huge RSA key costs the coordinator CPU for nothing.
MAX_RSA_BITS = 8192
MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

_DONOR_ID = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TOKEN = re.compile(
    rf"{TOKEN_PREFIX}_(?P<id>[0-9a-f]{{{2 * _TOKEN_ID_BYTES}}})_(?P<secret>[A-Za-z0-9_-]{{43,128}})"
)

_PEM = serialization.Encoding.PEM


class EnrollmentError(Exception):
    """The coordinator's TLS files are unusable (corrupt, mismatched, half missing).

    The message names the file and what to do; the files are never replaced silently,
    because a new CA would lock every enrolled donor out.
    """


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


# --- the CA ----------------------------------------------------------------------------


class CertificateAuthority:
    """The coordinator's CA: an EC P-256 key and its self-signed certificate.

    Build it with `load_or_create` (files) or `generate` (memory only, for tests and
    tools). Signing methods are pure apart from the randomness of keys and serials.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise ValueError("the CA key does not match the CA certificate")
        self._key = key
        self._cert = cert
        self._cert_pem = cert.public_bytes(_PEM)
        self._fingerprint = certificate_sha256(cert)

    @classmethod
    def generate(cls, now: datetime) -> CertificateAuthority:
        """A new CA valid for `CA_VALIDITY` from `now`, in memory only."""
        now = _utc_seconds(now, "now")
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
        _ensure_private_dir(directory)
        have_key, have_cert = key_file.exists(), cert_file.exists()
        if not have_key and not have_cert:
            ca = cls.generate(now)
            # Key first: a crash between the two writes leaves a key without a
            # certificate, which the next start reports instead of replacing.
            _write_atomically(key_file, ca._key_pem(), 0o600)
            _write_atomically(cert_file, ca.cert_pem, 0o644)
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
        _tighten_mode(key_file, 0o600)
        key = _read_private_key(key_file)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollmentError(f"{key_file}: not an EC private key")
        cert = _read_certificate(cert_file)
        try:
            ca = cls(key, cert)
        except ValueError:
            raise EnrollmentError(
                f"{cert_file}: does not belong to the key in {key_file}"
            ) from None
        if cert.not_valid_after_utc <= _utc_seconds(now, "now"):
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
            cert_pem=cert.public_bytes(_PEM),
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
        return _private_pem(key), cert.public_bytes(_PEM)

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
        return _private_pem(key), cert.public_bytes(_PEM)

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
        now = _utc_seconds(now, "now")
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
        return _private_pem(self._key)


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


# --- the coordinator's TLS directory ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoordinatorTls:
    """What the coordinator needs to serve TLS and sign enrollments.

    For grpc: the main port uses ``ssl_server_credentials([(server_key_pem,
    server_cert_pem)], root_certificates=ca_pem, require_client_auth=True)``, the
    enrollment port the same without client authentication. The admin CLI uses
    ``admin_key_pem``/``admin_cert_pem`` (files `admin_key_file`/`admin_cert_file`).
    """

    ca: CertificateAuthority = field(repr=False)
    directory: Path
    ca_cert_file: Path
    server_key_file: Path
    server_cert_file: Path
    admin_key_file: Path
    admin_cert_file: Path
    ca_pem: bytes = field(repr=False)
    server_key_pem: bytes = field(repr=False)
    server_cert_pem: bytes = field(repr=False)
    admin_key_pem: bytes = field(repr=False)
    admin_cert_pem: bytes = field(repr=False)


def prepare_tls(directory: Path, hostnames: Sequence[str], now: datetime) -> CoordinatorTls:
    """Load or create the coordinator's TLS files in `directory` and return them.

    The CA is created on first start (`CertificateAuthority.load_or_create`, whose
    errors propagate). The server key and certificate (``server.key``, ``server.pem``)
    are (re)issued when missing or unreadable, when their subjectAltNames differ from
    `hostnames`, when not signed by the CA, or within `RENEW_BEFORE` of expiry; the
    admin credential (``admin.key``, ``admin.pem``, both 0600) likewise apart from the
    hostnames. Both are derived from the CA, so replacing them loses nothing.
    """
    now = _utc_seconds(now, "now")
    wanted = set(san_entries(hostnames))
    ca = CertificateAuthority.load_or_create(directory, now)

    server_key_file = directory / SERVER_KEY_FILE
    server_cert_file = directory / SERVER_CERT_FILE

    def server_names_match(cert: x509.Certificate) -> bool:
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return False
        return set(ext.value) == wanted

    server = _current_pair(ca, server_key_file, server_cert_file, now, server_names_match)
    if server is None:
        server = ca.issue_server(hostnames, now, SERVER_VALIDITY)
        _write_atomically(server_key_file, server[0], 0o600)
        _write_atomically(server_cert_file, server[1], 0o644)
        logger.info("issued the coordinator's server certificate for %s", ", ".join(hostnames))

    admin_key_file = directory / ADMIN_KEY_FILE
    admin_cert_file = directory / ADMIN_CERT_FILE

    def is_admin(cert: x509.Certificate) -> bool:
        return _common_name(cert) == ADMIN_CN

    admin = _current_pair(ca, admin_key_file, admin_cert_file, now, is_admin)
    if admin is None:
        admin = ca.issue_admin(now, ADMIN_VALIDITY)
        _write_atomically(admin_key_file, admin[0], 0o600)
        _write_atomically(admin_cert_file, admin[1], 0o600)
        logger.info("issued the admin credential %s", admin_cert_file)

    return CoordinatorTls(
        ca=ca,
        directory=directory,
        ca_cert_file=directory / CA_CERT_FILE,
        server_key_file=server_key_file,
        server_cert_file=server_cert_file,
        admin_key_file=admin_key_file,
        admin_cert_file=admin_cert_file,
        ca_pem=ca.cert_pem,
        server_key_pem=server[0],
        server_cert_pem=server[1],
        admin_key_pem=admin[0],
        admin_cert_pem=admin[1],
    )


def _current_pair(
    ca: CertificateAuthority,
    key_file: Path,
    cert_file: Path,
    now: datetime,
    fits: Callable[[x509.Certificate], bool],
) -> tuple[bytes, bytes] | None:
    """The (key, cert) PEMs in the files if they are still good, else None (with the
    reason logged when the files exist)."""
    try:
        key_pem = key_file.read_bytes()
        cert_pem = cert_file.read_bytes()
    except FileNotFoundError:
        return None
    reason = None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        reason = "unreadable"
    else:
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            reason = "the key does not match the certificate"
        elif not ca.issued(cert):
            reason = "not signed by the current CA"
        elif cert.not_valid_after_utc - RENEW_BEFORE <= now:
            reason = f"expires on {cert.not_valid_after_utc.isoformat()}"
        elif not fits(cert):
            reason = "its names or role changed"
    if reason is not None:
        logger.warning("replacing %s and %s: %s", key_file, cert_file, reason)
        return None
    _tighten_mode(key_file, 0o600)
    return key_pem, cert_pem


# --- tokens ------------------------------------------------------------------------------


def new_token(now: datetime, ttl: timedelta, uses: int, note: str) -> tuple[str, TokenRecord]:
    """A new enrollment token: the text to hand out (``dtk_<token_id>_<secret>``,
    shown once) and the record to store, which keeps only sha256 of the secret.

    Raises `ValueError` naming the field: `ttl` from 1 minute to 30 days, `uses` from
    1 to 100000, `note` at most 256 characters.
    """
    now = _utc_seconds(now, "now")
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"ttl: must be between 1 minute and 30 days, got {ttl}")
    if isinstance(uses, bool) or not 1 <= uses <= MAX_TOKEN_USES:
        raise ValueError(f"uses: must be between 1 and {MAX_TOKEN_USES}, got {uses}")
    if len(note) > MAX_TOKEN_NOTE:
        raise ValueError(f"note: must be at most {MAX_TOKEN_NOTE} characters")
    token_id = secrets.token_hex(_TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(_TOKEN_SECRET_BYTES)
    record = TokenRecord(
        token_id=token_id,
        secret_sha256=_sha256_text(secret),
        created_at=now,
        expires_at=now + ttl,
        uses_left=uses,
        note=note,
    )
    return f"{TOKEN_PREFIX}_{token_id}_{secret}", record


def parse_token(text: str) -> tuple[str, str]:
    """(token_id, sha256 of the secret) of a token as `new_token` makes them.

    Surrounding whitespace is ignored (tokens come from config files and terminals).
    Raises ``ValueError("token: malformed ...")``; messages never contain the token.
    """
    if not isinstance(text, str):
        raise ValueError("token: malformed (not text)")
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"token: malformed (expected {TOKEN_PREFIX}_<id>_<secret>)")
    return match["id"], _sha256_text(match["secret"])


def token_refusal(record: TokenRecord | None, secret_sha256: str, now: datetime) -> str | None:
    """Why a token may not be used now, or None if it may. For the Enroll servicer:
    `record` is what the store holds for the token's id (None: none)."""
    # One answer for "no such id" and "wrong secret": no oracle for valid token ids.
    if record is None or not hmac.compare_digest(record.secret_sha256, secret_sha256):
        return "token: unknown or invalid"
    if record.expires_at <= now:
        return "token: expired"
    if record.uses_left <= 0:
        return "token: already used"
    return None


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --- identity ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling on the mTLS port: a donor (with its id) or the admin, and the
    fingerprint of the certificate presented (compared with the donor's record, so a
    revoked or replaced certificate is refused)."""

    role: Literal["donor", "admin"]
    donor_id: str | None
    cert_sha256: str


def donor_common_name(donor_id: str) -> str:
    """The CN of a donor's certificate; `ValueError` for an id that cannot be one."""
    if not _DONOR_ID.fullmatch(donor_id) or len(donor_id) > MAX_COMMON_NAME - len(DONOR_CN_PREFIX):
        raise ValueError(
            f"donor_id: must be 1 to {MAX_COMMON_NAME - len(DONOR_CN_PREFIX)} of A-Z a-z 0-9 . _ -"
        )
    return DONOR_CN_PREFIX + donor_id


def identity_from_auth_context(ctx: Mapping[str, Iterable[bytes]]) -> Identity | None:
    """The caller of a grpc handler from ``context.auth_context()``.

    None when the caller presented no certificate (the enrollment port), or one whose
    CN is neither ``admin`` nor ``donor:<id>``. The CN is read from the certificate
    itself, whose chain grpc has verified against the CA on the mTLS port.
    """
    # grpc.aio types the values as iterables (they are lists of bytes).
    first = next(iter(ctx.get("x509_pem_cert", ())), None)
    if not first:
        return None
    # grpc hands the PEM over as a C string; tolerate a trailing NUL.
    pem = first.rstrip(b"\0")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    fingerprint = certificate_sha256(cert)
    common_name = _common_name(cert)
    if common_name == ADMIN_CN:
        return Identity(role="admin", donor_id=None, cert_sha256=fingerprint)
    if common_name is not None and common_name.startswith(DONOR_CN_PREFIX):
        donor_id = common_name[len(DONOR_CN_PREFIX) :]
        if _DONOR_ID.fullmatch(donor_id):
            return Identity(role="donor", donor_id=donor_id, cert_sha256=fingerprint)
    return None


def certificate_sha256(cert: x509.Certificate) -> str:
    """sha256 of a certificate's DER, lowercase hex (`DonorRecord.cert_sha256`)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


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


def _common_name(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


# --- helpers -----------------------------------------------------------------------------


def _utc_seconds(moment: datetime, name: str) -> datetime:
    # X.509 times have whole seconds; truncating here makes `not_after` equal to what
    # the certificate says.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name}: must be a timezone-aware datetime")
    return moment.replace(microsecond=0)


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _read_private_key(file: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(file.read_bytes(), password=None)
    except OSError as error:
        raise EnrollmentError(f"{file}: cannot be read ({error.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EnrollmentError(
            f"{file}: not a PEM private key (corrupt?); restore it from a backup"
        ) from None


def _read_certificate(file: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(file.read_bytes())
    except OSError as error:
        raise EnrollmentError(f"{file}: cannot be read ({error.strerror})") from None
    except ValueError:
        raise EnrollmentError(
            f"{file}: not a PEM certificate (corrupt?); restore it from a backup"
        ) from None


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask; set it exactly.
    os.chmod(directory, 0o700)


def _tighten_mode(file: Path, mode: int) -> None:
    current = file.stat().st_mode & 0o777
    if os.name == "posix" and current & ~mode:
        logger.warning("%s had mode %o; setting %o", file, current, mode)
        os.chmod(file, mode)


def _write_atomically(file: Path, data: bytes, mode: int) -> None:
    """Write `data` to `file` with `mode` so that a crash leaves the old or the new
    content, and the secret is never readable by others, even for a moment."""
    # mkstemp creates the file 0600; it is chmod'ed to `mode` before it gets its name.
    fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            if os.name == "posix":
                os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if os.name == "posix":
        directory = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
