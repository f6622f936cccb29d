"""The agent's coordinator credential as it is stored: `DonorCredentials` and its JSON form.

The agent enrolls once (`donor_app.agent.credentials` makes the key and the CSR) and
keeps what Enroll returned in the keyring or a 0600 file (`donor_app.settings.secrets`),
serialised with `DonorCredentials.to_json`; `from_json` checks every field on the way
back, so a damaged credential makes the agent enroll again instead of failing later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

# Bump when the JSON layout changes; from_json refuses versions it does not know, and the
# agent then enrolls again rather than guessing.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class DonorCredentials:
    """What the agent needs for mTLS with its coordinator. `not_after` is the
    certificate's expiry (aware UTC). The key is left out of `repr` so that logging the
    object never leaks it."""

    donor_id: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    ca_pem: bytes
    not_after: datetime

    def to_json(self) -> str:
        """A JSON object (one line) that `from_json` reads back."""
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "donor_id": self.donor_id,
                "key_pem": self.key_pem.decode("ascii"),
                "cert_pem": self.cert_pem.decode("ascii"),
                "ca_pem": self.ca_pem.decode("ascii"),
                "not_after": self.not_after.isoformat(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> DonorCredentials:
        """Parse `to_json`'s output. Raises `ValueError` naming the field for anything
        else: not JSON, an unknown version, a missing field, PEM that does not parse,
        a key that does not belong to the certificate, a naive or bad time."""
        try:
            data: Any = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"credentials: not JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError("credentials: not a JSON object")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"version: expected {FORMAT_VERSION}, got {data.get('version')!r}")
        donor_id = _text(data, "donor_id")
        if not donor_id:
            raise ValueError("donor_id: empty")
        key_pem = _text(data, "key_pem").encode("ascii")
        cert_pem = _text(data, "cert_pem").encode("ascii")
        ca_pem = _text(data, "ca_pem").encode("ascii")
        try:
            not_after = datetime.fromisoformat(_text(data, "not_after"))
        except ValueError:
            raise ValueError("not_after: not an ISO 8601 time") from None
        if not_after.tzinfo is None:
            raise ValueError("not_after: has no time zone")
        _check_pems(key_pem, cert_pem, ca_pem)
        return cls(
            donor_id=donor_id,
            key_pem=key_pem,
            cert_pem=cert_pem,
            ca_pem=ca_pem,
            not_after=not_after,
        )


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name}: missing or not a string")
    if not value.isascii():
        raise ValueError(f"{name}: not ASCII")
    return value


def _check_pems(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
    # A damaged credential is caught here, where the agent can enroll again, instead of
    # as an obscure TLS handshake failure later.
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("key_pem: not a PEM private key") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError("cert_pem: not a PEM certificate") from None
    try:
        x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ValueError("ca_pem: not a PEM certificate") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ValueError("key_pem: does not belong to cert_pem")
