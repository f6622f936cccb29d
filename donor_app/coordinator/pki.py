"""The building blocks of the coordinator's PKI: whole-second UTC times (what X.509
holds), key encodings, and its PEM files on disk.

The files live in a 0700 directory and are read with errors that name the file and say
what to do (`EnrollmentError`); the CA and the TLS files write them with
`donor_app.atomic_file.write_atomic` and an exact mode.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

logger = logging.getLogger(__name__)

PEM = serialization.Encoding.PEM


class EnrollmentError(Exception):
    """The coordinator's TLS files are unusable (corrupt, mismatched, half missing).

    The message names the file and what to do; the files are never replaced silently,
    because a new CA would lock every enrolled donor out.
    """


def utc_seconds(moment: datetime, name: str) -> datetime:
    """`moment` without its microseconds; `ValueError` naming `name` if it is naive."""
    # X.509 times have whole seconds; truncating here makes `not_after` equal to what
    # the certificate says.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name}: must be a timezone-aware datetime")
    return moment.replace(microsecond=0)


def public_key_der(key: PublicKeyTypes) -> bytes:
    """A public key as DER SubjectPublicKeyInfo (to compare two keys)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def read_private_key(file: Path) -> PrivateKeyTypes:
    """The PEM private key in `file`; `EnrollmentError` naming the file if it cannot be."""
    try:
        return serialization.load_pem_private_key(file.read_bytes(), password=None)
    except OSError as error:
        raise EnrollmentError(f"{file}: cannot be read ({error.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EnrollmentError(
            f"{file}: not a PEM private key (corrupt?); restore it from a backup"
        ) from None


def read_certificate(file: Path) -> x509.Certificate:
    """The PEM certificate in `file`; `EnrollmentError` naming the file if it cannot be."""
    try:
        return x509.load_pem_x509_certificate(file.read_bytes())
    except OSError as error:
        raise EnrollmentError(f"{file}: cannot be read ({error.strerror})") from None
    except ValueError:
        raise EnrollmentError(
            f"{file}: not a PEM certificate (corrupt?); restore it from a backup"
        ) from None


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (and its parents) with mode 0700 unless it exists."""
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask; set it exactly.
    os.chmod(directory, 0o700)


def tighten_mode(file: Path, mode: int) -> None:
    """Narrow `file` to `mode` (logged) if it allows more."""
    current = file.stat().st_mode & 0o777
    if os.name == "posix" and current & ~mode:
        logger.warning("%s had mode %o; setting %o", file, current, mode)
        os.chmod(file, mode)
