"""CredentialStore: the keyring when there is one, else a 0600 file, and the log says so.

The real Secret Service is exercised in tests/integration/test_secrets_keyring.py; here
the keyring is either keyring's `fail` backend (what a headless host gets) or a small
in-memory backend standing in for a working (or breaking) OS keyring.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors
import pytest

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.ca import CertificateAuthority
from donor_app.settings.credentials import DonorCredentials
from donor_app.settings.secrets import USERNAME, CredentialStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class MemoryKeyring(keyring.backend.KeyringBackend):
    """An OS keyring stand-in; `broken` makes every call fail like a locked keyring."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.items: dict[tuple[str, str], str] = {}
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise keyring.errors.KeyringLocked("locked")

    def get_password(self, service: str, username: str) -> str | None:
        self._check()
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._check()
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self._check()
        if self.items.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("absent")


def _use(backend: keyring.backend.KeyringBackend) -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    try:
        yield
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    yield from _use(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    backend = MemoryKeyring()
    for _ in _use(backend):
        yield backend


@pytest.fixture(scope="module")
def creds() -> DonorCredentials:
    ca = CertificateAuthority.generate(NOW)
    key_pem, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, "donor:d1", NOW, timedelta(days=90))
    return DonorCredentials("d1", key_pem, issued.cert_pem, ca.cert_pem, issued.not_after)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# --- no keyring: the file ------------------------------------------------------------------


@pytest.mark.usefixtures("no_keyring")
def test_file_fallback_round_trip_with_private_modes(
    tmp_path: Path, creds: DonorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="donor_app.settings.secrets")
    directory = tmp_path / "state" / "agent"
    store = CredentialStore(directory)

    assert store.load() is None
    store.save(creds)

    file = directory / "credentials.json"
    assert mode(directory) == 0o700
    assert mode(file) == 0o600
    assert store.location == f"file {file} (0600)"
    assert CredentialStore(directory).load() == creds
    assert not [p for p in directory.iterdir() if p.name != "credentials.json"]

    warned = messages(caplog, logging.WARNING)
    assert len(warned) == 2  # once per store, saying why and where
    assert "no keyring is available" in warned[0]
    assert str(file) in warned[0]


@pytest.mark.usefixtures("no_keyring")
def test_nothing_is_chosen_or_written_before_first_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="donor_app.settings.secrets")
    CredentialStore(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    assert caplog.records == []


@pytest.mark.usefixtures("no_keyring")
def test_save_replaces_and_delete_removes(tmp_path: Path, creds: DonorCredentials) -> None:
    store = CredentialStore(tmp_path)
    store.save(creds)
    renewed = DonorCredentials(
        creds.donor_id, creds.key_pem, creds.cert_pem, creds.ca_pem, NOW + timedelta(days=1)
    )
    store.save(renewed)
    assert store.load() == renewed

    store.delete()
    assert store.load() is None
    assert not (tmp_path / "credentials.json").exists()
    store.delete()  # absent is fine


@pytest.mark.usefixtures("no_keyring")
@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": 1}', b"\xff" * 10])
def test_a_corrupt_file_is_logged_and_treated_as_absent(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "credentials.json"
    file.write_bytes(content)
    file.chmod(0o600)

    assert CredentialStore(tmp_path).load() is None

    assert any(
        "unusable" in m and str(file) in m and "enrolling again" in m
        for m in messages(caplog, logging.WARNING)
    )


@pytest.mark.usefixtures("no_keyring")
def test_a_loose_file_mode_is_tightened(tmp_path: Path, creds: DonorCredentials) -> None:
    store = CredentialStore(tmp_path)
    store.save(creds)
    (tmp_path / "credentials.json").chmod(0o644)
    assert store.load() == creds
    assert mode(tmp_path / "credentials.json") == 0o600


# --- a keyring -----------------------------------------------------------------------------


def test_keyring_round_trip_writes_no_file(
    tmp_path: Path,
    creds: DonorCredentials,
    memory_keyring: MemoryKeyring,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="donor_app.settings.secrets")
    store = CredentialStore(tmp_path / "fallback", service="svc")

    store.save(creds)

    assert memory_keyring.items[("svc", USERNAME)] == creds.to_json()
    assert CredentialStore(tmp_path / "fallback", service="svc").load() == creds
    assert store.location == "the keyring (test_secrets)"
    assert not (tmp_path / "fallback").exists()
    assert any("using the keyring" in m for m in messages(caplog, logging.INFO))

    store.delete()
    assert memory_keyring.items == {}
    assert store.load() is None


def test_a_corrupt_keyring_value_is_treated_as_absent(
    tmp_path: Path, memory_keyring: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    memory_keyring.items[("donor_app", USERNAME)] = "garbage"
    assert CredentialStore(tmp_path).load() is None
    assert any("the keyring" in m and "unusable" in m for m in messages(caplog, logging.WARNING))


def test_a_failing_keyring_falls_back_to_the_file(
    tmp_path: Path,
    creds: DonorCredentials,
    memory_keyring: MemoryKeyring,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = CredentialStore(tmp_path)
    memory_keyring.broken = True

    store.save(creds)

    assert mode(tmp_path / "credentials.json") == 0o600
    assert store.location == f"file {tmp_path / 'credentials.json'} (0600)"
    assert store.load() == creds
    warned = messages(caplog, logging.WARNING)
    assert len(warned) == 1
    assert "KeyringLocked" in warned[0]


def test_a_file_from_before_the_keyring_is_still_read_and_then_replaced(
    tmp_path: Path, creds: DonorCredentials, memory_keyring: MemoryKeyring
) -> None:
    memory_keyring.broken = True
    CredentialStore(tmp_path).save(creds)
    memory_keyring.broken = False

    store = CredentialStore(tmp_path)
    assert store.load() == creds

    store.save(creds)
    assert not (tmp_path / "credentials.json").exists()
    assert store.load() == creds


def test_delete_clears_keyring_and_file(
    tmp_path: Path, creds: DonorCredentials, memory_keyring: MemoryKeyring
) -> None:
    memory_keyring.broken = True
    CredentialStore(tmp_path).save(creds)
    memory_keyring.broken = False
    store = CredentialStore(tmp_path)
    memory_keyring.items[("donor_app", USERNAME)] = creds.to_json()

    store.delete()

    assert memory_keyring.items == {}
    assert not (tmp_path / "credentials.json").exists()
