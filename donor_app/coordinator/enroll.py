"""Enrollment: a token and a CSR become a donor with a certificate.

The order matters for "a refused request changes nothing": the CSR is checked before
the token is spent, and the token is spent (atomically) before the donor is added.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from donor_app.coordinator.ca import CertificateAuthority, CsrRejected, IssuedCertificate
from donor_app.coordinator.fleet import Fleet, new_id
from donor_app.coordinator.fleet.session import Code, Refused
from donor_app.coordinator.identity import donor_common_name
from donor_app.coordinator.store.ports import TokenRefused
from donor_app.coordinator.tokens import parse_token
from donor_app.domain.records import DonorRecord

HOSTNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
MAX_CSR_BYTES = 16 * 1024

_TOKEN_REASONS = {
    "unknown": "token: not known here (mistyped, or from another coordinator)",
    "expired": "token: expired; ask your administrator for a new one",
    "used": "token: already used up; ask your administrator for a new one",
}


@dataclass(frozen=True, slots=True)
class Enrolled:
    donor_id: str
    certificate: IssuedCertificate


async def enroll(
    fleet: Fleet,
    ca: CertificateAuthority,
    *,
    token: str,
    csr_pem: bytes,
    hostname: str,
    now: datetime,
    valid_for: timedelta,
) -> Enrolled:
    """Raises Refused naming the field at fault; then nothing was stored or spent."""
    try:
        token_id, secret_sha256 = parse_token(token)
    except ValueError as error:
        raise Refused(Code.INVALID_ARGUMENT, str(error)) from None
    if not HOSTNAME_PATTERN.fullmatch(hostname):
        raise Refused(
            Code.INVALID_ARGUMENT,
            f"hostname: {hostname[:80]!r} is not a host name (letters, digits, '.', '-')",
        )
    if len(csr_pem) > MAX_CSR_BYTES:
        raise Refused(Code.INVALID_ARGUMENT, f"csr_pem: larger than {MAX_CSR_BYTES} bytes")
    donor_id = new_id("d")
    try:
        certificate = ca.sign_client(csr_pem, donor_common_name(donor_id), now, valid_for)
    except CsrRejected as error:
        raise Refused(Code.INVALID_ARGUMENT, f"csr_pem: {error}") from None
    try:
        await asyncio.to_thread(fleet.store.use_token, token_id, secret_sha256, now)
    except TokenRefused as error:
        raise Refused(Code.UNAUTHENTICATED, _TOKEN_REASONS.get(error.reason, str(error))) from None
    await fleet.add_donor(
        DonorRecord(
            donor_id=donor_id, hostname=hostname, cert_sha256=certificate.sha256, enrolled_at=now
        )
    )
    return Enrolled(donor_id, certificate)
