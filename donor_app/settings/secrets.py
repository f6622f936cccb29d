"""Where the agent keeps its coordinator credential: the OS keyring, else a 0600 file.

Secrets go into the OS keyring through `keyring` (docs/design.md, "Security"); where
there is none (a headless service: no D-Bus session, so keyring picks its `fail`
backend and raises `NoKeyringError`) they go into a 0600 file in the service's state
directory, and the log says which. The backend is chosen on first use, never at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors

from donor_app.atomic_file import write_atomic
from donor_app.settings.credentials import DonorCredentials

logger = logging.getLogger(__name__)

USERNAME = "donor-credentials"
FILE_NAME = "credentials.json"


class CredentialStore:
    """Load, save and delete the agent's `DonorCredentials`.

    The keyring backend is looked up on the first call (which may talk to D-Bus, so it
    can block briefly); if it is unusable, or fails later, the store uses
    ``fallback_dir/credentials.json`` (0600, directory 0700) for the rest of its life
    and logs once which location it uses and why. Methods may be called from any
    thread; they serialise on a lock.
    """

    def __init__(self, fallback_dir: Path, service: str = "donor_app") -> None:
        self._file = fallback_dir / FILE_NAME
        self._service = service
        self._lock = threading.Lock()
        self._chosen = False
        self._backend: keyring.backend.KeyringBackend | None = None  # None: the file

    @property
    def file(self) -> Path:
        """The fallback file (whether or not it is in use)."""
        return self._file

    @property
    def location(self) -> str:
        """Where the credential lives, for people: "the keyring (SecretService)" or
        "file /x/credentials.json (0600)"."""
        with self._lock:
            backend = self._select()
        if backend is None:
            return f"file {self._file} (0600)"
        return f"the keyring ({_backend_name(backend)})"

    def load(self) -> DonorCredentials | None:
        """The stored credential, or None if there is none or it is unusable (logged:
        the agent then enrolls again)."""
        with self._lock:
            backend = self._select()
            if backend is not None:
                try:
                    text = backend.get_password(self._service, USERNAME)
                except Exception as error:  # backends raise their own types (D-Bus...)
                    self._give_up_keyring(backend, error)
                else:
                    if text is not None:
                        return _parse(text, f"the keyring ({_backend_name(backend)})")
                    # Saved while the keyring was unavailable (e.g. before a desktop
                    # session existed): still ours.
                    if not self._file.exists():
                        return None
                    logger.info("credentials: not in the keyring; reading %s", self._file)
            return self._load_file()

    def save(self, creds: DonorCredentials) -> None:
        """Store `creds`, replacing what was stored. Raises `OSError` if even the
        fallback file cannot be written."""
        text = creds.to_json()
        with self._lock:
            backend = self._select()
            if backend is not None:
                try:
                    backend.set_password(self._service, USERNAME, text)
                except Exception as error:  # see load
                    self._give_up_keyring(backend, error)
                else:
                    # An older credential left in the file would only be a stale secret.
                    self._remove_file()
                    return
            _ensure_private_dir(self._file.parent)
            # A crash leaves the old or the new credential, never half of one.
            write_atomic(self._file, text.encode("ascii"), 0o600)

    def delete(self) -> None:
        """Forget the credential wherever it is stored (absent is fine)."""
        with self._lock:
            backend = self._select()
            if backend is not None:
                try:
                    backend.delete_password(self._service, USERNAME)
                except keyring.errors.PasswordDeleteError:
                    pass  # nothing stored
                except Exception as error:  # see load
                    self._give_up_keyring(backend, error)
            self._remove_file()

    # --- internals (called with the lock held) ---

    def _select(self) -> keyring.backend.KeyringBackend | None:
        if not self._chosen:
            backend, reason = _usable_keyring()
            if backend is None:
                logger.warning("credentials: %s; using file %s (0600)", reason, self._file)
            else:
                logger.info("credentials: using the keyring (%s)", _backend_name(backend))
            self._backend = backend
            self._chosen = True
        return self._backend

    def _give_up_keyring(self, backend: keyring.backend.KeyringBackend, error: Exception) -> None:
        logger.warning(
            "credentials: the keyring (%s) failed (%s: %s); using file %s (0600) from now on",
            _backend_name(backend),
            type(error).__name__,
            error,
            self._file,
        )
        self._backend = None

    def _load_file(self) -> DonorCredentials | None:
        try:
            text = self._file.read_bytes()
            _tighten_mode(self._file)
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning(
                "credentials: cannot read %s (%s); enrolling again", self._file, error.strerror
            )
            return None
        return _parse(text, f"file {self._file}")

    def _remove_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file.unlink()
            logger.info("credentials: removed %s", self._file)


def _usable_keyring() -> tuple[keyring.backend.KeyringBackend | None, str]:
    """The keyring backend to use, or None and why not."""
    try:
        backend = keyring.get_keyring()
    except Exception as error:  # a broken keyring config raises at selection
        return None, f"the keyring cannot be set up ({type(error).__name__}: {error})"
    if isinstance(backend, keyring.backends.fail.Keyring):
        return None, "no keyring is available (no Secret Service / D-Bus session?)"
    # keyrings.alt stores plaintext in the home directory: no better than our 0600 file
    # and not what an owner expects from "the keyring".
    if type(backend).__module__.startswith("keyrings.alt"):
        return None, f"the keyring backend {_backend_name(backend)} is not a secure store"
    return backend, ""


def _backend_name(backend: keyring.backend.KeyringBackend) -> str:
    # keyring.backends.SecretService.Keyring -> "SecretService", .macOS -> "macOS".
    return type(backend).__module__.rsplit(".", 1)[-1]


def _parse(text: str | bytes, where: str) -> DonorCredentials | None:
    try:
        return DonorCredentials.from_json(text)
    except ValueError as error:
        logger.warning(
            "credentials: the stored credential in %s is unusable (%s); enrolling again",
            where,
            error,
        )
        return None


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask; set it exactly.
    os.chmod(directory, 0o700)


def _tighten_mode(file: Path) -> None:
    if os.name != "posix":
        return
    mode = file.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("credentials: %s had mode %o; setting 600", file, mode)
        os.chmod(file, 0o600)
