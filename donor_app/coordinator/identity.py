"""Who a coordinator certificate names, and who is calling on the mTLS port.

Certificates the CA issues carry CN ``admin`` (the admin credential) or
``donor:<donor_id>``; a donor's record keeps the sha256 of its current certificate.
Nothing here imports grpc: the servicers pass ``context.auth_context()`` to
`identity_from_auth_context`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

ADMIN_CN = "admin"
DONOR_CN_PREFIX = "donor:"
# RFC 5280's upper bound for a common name.
MAX_COMMON_NAME = 64

_DONOR_ID = re.compile(r"[A-Za-z0-9._-]+")


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
    name = common_name(cert)
    if name == ADMIN_CN:
        return Identity(role="admin", donor_id=None, cert_sha256=fingerprint)
    if name is not None and name.startswith(DONOR_CN_PREFIX):
        donor_id = name[len(DONOR_CN_PREFIX) :]
        if _DONOR_ID.fullmatch(donor_id):
            return Identity(role="donor", donor_id=donor_id, cert_sha256=fingerprint)
    return None


def certificate_sha256(cert: x509.Certificate) -> str:
    """sha256 of a certificate's DER, lowercase hex (`DonorRecord.cert_sha256`)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str | None:
    """The certificate's one common name, None if it has none or several."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value
