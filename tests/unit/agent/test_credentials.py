"""The agent's key, CSR and stored credential format."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.ca import CertificateAuthority
from donor_app.settings.credentials import DonorCredentials

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_credentials(donor_id: str = "d1") -> DonorCredentials:
    ca = CertificateAuthority.generate(NOW)
    key_pem, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, f"donor:{donor_id}", NOW, timedelta(days=90))
    return DonorCredentials(
        donor_id=donor_id,
        key_pem=key_pem,
        cert_pem=issued.cert_pem,
        ca_pem=ca.cert_pem,
        not_after=issued.not_after,
    )


@pytest.fixture(scope="module")
def creds() -> DonorCredentials:
    return make_credentials()


def test_new_key_and_csr() -> None:
    key_pem, csr_pem = new_key_and_csr()

    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert csr.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    assert new_key_and_csr()[0] != key_pem


def test_json_round_trip(creds: DonorCredentials) -> None:
    text = creds.to_json()
    assert DonorCredentials.from_json(text) == creds
    assert DonorCredentials.from_json(text.encode()) == creds
    assert json.loads(text)["version"] == 1


def test_repr_hides_the_key(creds: DonorCredentials) -> None:
    assert "PRIVATE KEY" not in repr(creds)
    assert "d1" in repr(creds)


def _with(creds: DonorCredentials, **changes: object) -> str:
    data = json.loads(creds.to_json())
    for name, value in changes.items():
        if value is None:
            del data[name]
        else:
            data[name] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"version": 2}, "version"),
        ({"version": None}, "version"),
        ({"donor_id": ""}, "donor_id"),
        ({"donor_id": 7}, "donor_id"),
        ({"key_pem": None}, "key_pem"),
        ({"key_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, "key_pem"),
        ({"cert_pem": "junk"}, "cert_pem"),
        ({"ca_pem": "junk"}, "ca_pem"),
        ({"ca_pem": "é"}, "ca_pem"),
        ({"not_after": "yesterday"}, "not_after"),
        ({"not_after": "2025-06-01T00:00:00"}, "not_after"),
        ({"not_after": None}, "not_after"),
    ],
)
def test_from_json_names_the_bad_field(
    creds: DonorCredentials, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        DonorCredentials.from_json(_with(creds, **changes))


def test_from_json_refuses_a_key_of_another_certificate(creds: DonorCredentials) -> None:
    other = make_credentials("d2")
    with pytest.raises(ValueError, match="key_pem: does not belong"):
        DonorCredentials.from_json(_with(creds, key_pem=other.key_pem.decode()))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", b"\xff\xfe"])
def test_from_json_refuses_non_objects(text: str | bytes) -> None:
    with pytest.raises(ValueError, match="^credentials: "):
        DonorCredentials.from_json(text)
