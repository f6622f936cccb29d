"""The agent's credential round-trips through a real Secret Service (gnome-keyring).

A private D-Bus session (dbus-run-session) runs gnome-keyring-daemon with an unlocked
login keyring, a temporary HOME and no DISPLAY (else an unlock prompt can hang on the X
display). Inside it this module runs twice as a script: once to save the credential
with a `CredentialStore`, once, as a new process, to load it back.
Each run prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.ca import CertificateAuthority
from donor_app.settings.credentials import DonorCredentials
from donor_app.settings.secrets import CredentialStore

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 90
SERVICE = "donor_app-test"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Secret Service is Linux")


def _child(action: str, fallback_dir: Path, creds_file: Path | None) -> None:
    """The part that runs inside the D-Bus session."""
    store = CredentialStore(fallback_dir, service=SERVICE)
    result: dict[str, object] = {"location": store.location}
    if action == "save":
        assert creds_file is not None
        store.save(DonorCredentials.from_json(creds_file.read_text()))
    else:
        loaded = store.load()
        result["creds"] = None if loaded is None else loaded.to_json()
    print("RESULT " + json.dumps(result), flush=True)


@pytest.fixture
def session_dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    # The runtime dir holds gnome-keyring's control socket: keep its path short (Unix
    # socket paths are limited to 108 bytes, pytest's tmp_path can be long).
    runtime = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
    try:
        home = tmp_path / "home"
        home.mkdir()
        yield {"home": home, "runtime": runtime, "fallback": tmp_path / "fallback"}
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_credentials_round_trip_through_gnome_keyring(
    tmp_path: Path, session_dirs: dict[str, Path]
) -> None:
    for tool in ("dbus-run-session", "gnome-keyring-daemon"):
        assert shutil.which(tool), f"{tool} is missing: install dbus and gnome-keyring"

    now = datetime.now(UTC)
    ca = CertificateAuthority.generate(now)
    key_pem, csr_pem = new_key_and_csr()
    issued = ca.sign_client(csr_pem, "donor:kr1", now, timedelta(days=1))
    creds = DonorCredentials("kr1", key_pem, issued.cert_pem, ca.cert_pem, issued.not_after)
    creds_file = tmp_path / "creds-in.json"  # the test's input, outside HOME
    creds_file.write_text(creds.to_json())

    home, fallback = session_dirs["home"], session_dirs["fallback"]
    python = shlex.quote(sys.executable)
    module = "tests.integration.test_secrets_keyring"
    script = (
        "echo -n pw | gnome-keyring-daemon --unlock --components=secrets >/dev/null"
        " || exit 90; "
        f"{python} -m {module} save {shlex.quote(str(fallback))} "
        f"{shlex.quote(str(creds_file))} || exit 91; "
        f"exec {python} -m {module} load {shlex.quote(str(fallback))}"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"}
        and not key.startswith(("XDG_", "PYTHON_KEYRING"))
    }
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(session_dirs["runtime"]),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        PYTHONPATH=str(REPO),
    )
    # A session of its own: on timeout the whole group (dbus-daemon, gnome-keyring,
    # python) is killed, not just dbus-run-session.
    process = subprocess.Popen(
        ["dbus-run-session", "--", "sh", "-c", script],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the keyring session did not finish in {DEADLINE_S} s:\n{out}\n{err}")
    assert process.returncode == 0, f"exit {process.returncode}:\n{out}\n{err}"

    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, f"{out}\n{err}"
    saved, loaded = results
    assert saved["location"] == "the keyring (SecretService)"
    assert loaded["location"] == "the keyring (SecretService)"
    assert loaded["creds"] is not None
    assert DonorCredentials.from_json(loaded["creds"]) == creds

    assert not fallback.exists(), "the fallback file was written although a keyring exists"
    # The keyring stores it encrypted: the private key is in no file under HOME.
    key_body = key_pem.decode().splitlines()[1].encode()
    stored = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".keyring" for p in stored), stored
    assert not [p for p in stored if key_body in p.read_bytes()]


if __name__ == "__main__":
    _child(
        sys.argv[1],
        Path(sys.argv[2]),
        Path(sys.argv[3]) if len(sys.argv) > 3 else None,
    )
