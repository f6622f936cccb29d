"""The coordinator's TLS directory: the CA, the server's key and certificate, and the
admin credential, loaded or (re)issued at start.

`prepare_tls` returns them as `CoordinatorTls`; the server and admin files derive from
the CA and are reissued whenever they are missing, unreadable, stale or about to expire,
so replacing them loses nothing. Nothing here imports grpc: the server turns
`CoordinatorTls` into grpc credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from donor_app.atomic_file import write_atomic
from donor_app.coordinator.ca import CA_CERT_FILE, CertificateAuthority, san_entries
from donor_app.coordinator.identity import ADMIN_CN, common_name
from donor_app.coordinator.pki import public_key_der, tighten_mode, utc_seconds

logger = logging.getLogger(__name__)

SERVER_KEY_FILE = "server.key"
SERVER_CERT_FILE = "server.pem"
ADMIN_KEY_FILE = "admin.key"
ADMIN_CERT_FILE = "admin.pem"

SERVER_VALIDITY = timedelta(days=365)
ADMIN_VALIDITY = timedelta(days=730)
# prepare_tls reissues the server and admin certificates this long before they expire,
# so a coordinator restarted now and then never serves an expired certificate.
RENEW_BEFORE = timedelta(days=30)


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
    now = utc_seconds(now, "now")
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
        write_atomic(server_key_file, server[0], 0o600)
        write_atomic(server_cert_file, server[1], 0o644)
        logger.info("issued the coordinator's server certificate for %s", ", ".join(hostnames))

    admin_key_file = directory / ADMIN_KEY_FILE
    admin_cert_file = directory / ADMIN_CERT_FILE

    def is_admin(cert: x509.Certificate) -> bool:
        return common_name(cert) == ADMIN_CN

    admin = _current_pair(ca, admin_key_file, admin_cert_file, now, is_admin)
    if admin is None:
        admin = ca.issue_admin(now, ADMIN_VALIDITY)
        write_atomic(admin_key_file, admin[0], 0o600)
        write_atomic(admin_cert_file, admin[1], 0o600)
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
        if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
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
    tighten_mode(key_file, 0o600)
    return key_pem, cert_pem
