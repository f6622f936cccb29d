"""The agent's side of enrolling: a new key and the certificate signing request for it.

The agent enrolls once with a token and the CSR made here, then keeps the resulting
`donor_app.settings.credentials.DonorCredentials` in the keyring or a 0600 file
(`donor_app.settings.secrets`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# The CSR's subject is ignored by the coordinator (it sets CN donor:<id>); this only makes
# the request readable to a person.
_CSR_SUBJECT = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "donor_app agent")])


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A new EC P-256 key (PKCS#8 PEM, unencrypted) and a CSR for it (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_CSR_SUBJECT)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
