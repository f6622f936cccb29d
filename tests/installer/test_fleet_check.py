"""installer/fleet_check.py: the fleet config checker and the file it lands. Fast: no
package is built; the checker's own module is imported."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from donor_app.settings.config import load_fleet, load_link_config
from tests.config_fuzz import FLEET, WORST, places, prepare, replaced, shown_value, toml

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "installer" / "fleet_check.py"
    spec = importlib.util.spec_from_file_location("fleet_check", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fleet_check = _load()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "source.toml"
    path.write_text(text)
    return path


FULL = f"""
reason = "IT \\"policy\\""
max_cpu_percent = 40
max_memory_mib = 4096
owner_may_disable = false

[[blackout]]
label = "backups"
days = ["mon", "sun"]
start = 01:00:00
end = "03:00"

[coordinator]
address = "127.0.0.1:1"
enroll_address = "127.0.0.1:1"
ca_pem = \"\"\"{CA}\"\"\"
token = "s3cret"
"""


def test_install_lands_policy_token_and_ca_with_safe_modes(tmp_path: Path) -> None:
    site = tmp_path / "etc"
    notes = fleet_check.install(write(tmp_path, FULL), site)
    assert stat.S_IMODE((site / "fleet.toml").stat().st_mode) == 0o644
    assert stat.S_IMODE((site / "enroll-token").stat().st_mode) == 0o600
    assert (site / "enroll-token").read_text() == "s3cret\n"
    assert (site / "coordinator-ca.pem").read_text() == CA
    assert "s3cret" not in (site / "fleet.toml").read_text()
    # What landed is read by the agent's own loaders as the admin wrote it.
    policy = load_fleet(site / "fleet.toml")
    assert (policy.max_cpu_percent, policy.max_memory_mib, policy.reason) == (
        40,
        4096,
        'IT "policy"',
    )
    assert policy.blackout[0].label == "backups"
    link = load_link_config(site / "fleet.toml")
    assert link is not None
    assert (link.token, link.token_file) == ("s3cret", site / "enroll-token")
    assert link.ca_pem == CA.encode()
    assert any("does not answer now" in note for note in notes)  # port 1: nobody there


def test_a_token_file_moves_into_the_site_dir(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(CA)
    (tmp_path / "token").write_text("from-a-file\n")
    source = write(
        tmp_path,
        f'[coordinator]\naddress = "h:7443"\nca_file = "{tmp_path}/ca.pem"\n'
        f'token_file = "{tmp_path}/token"\n',
    )
    site = tmp_path / "site"
    fleet_check.install(source, site)
    assert (site / "enroll-token").read_text() == "from-a-file\n"
    landed = tomllib.loads((site / "fleet.toml").read_text())
    assert landed["coordinator"]["token_file"] == str(site / "enroll-token")


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        (None, 3, "does not exist"),
        ("a = [", 4, "not valid TOML"),
        ("max_cpu_percent = 101", 4, "max_cpu_percent"),
        ("[coordinator]\naddress = 'h:7443'\n", 4, "coordinator.ca_file"),
        (
            "[[blackout]]\nlabel = 'x'\ndays = ['mon']\nstart = '01:00'\nend = '01:00'\n",
            4,
            "blackout",
        ),
    ],
)
def test_bad_input_is_rejected_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, code: int, words: str
) -> None:
    source = write(tmp_path, text) if text is not None else tmp_path / "absent.toml"
    site = tmp_path / "site"
    assert fleet_check.main(["install", str(source), str(site)]) == code
    assert words in capsys.readouterr().err
    assert not site.exists()


def _hostile_sources(tmp_path: Path) -> list[tuple[str, Path]]:
    """Fleet configs that made the checker fail with a traceback: each is invalid (4)."""
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    os.mkfifo(tmp_path / "fifo")
    coordinator = f'[coordinator]\naddress = "h:7443"\nca_pem = """{CA}"""\n'
    texts = {
        "nested": "reason = " + "[" * 5000 + "]" * 5000,
        "digits": "max_cpu_percent = " + "9" * 5000,
        "huge": "max_cpu_percent = " + "9" * 400,
        "nul": coordinator + 'token_file = "/tmp/token\\u0000"',
        "long": coordinator + f'token_file = "/tmp/{"t" * 300}"',
        "binary": coordinator + f'token_file = "{tmp_path}/binary"',
        "endless": coordinator + 'token_file = "/dev/zero"',
        "fifo": coordinator + f'token_file = "{tmp_path}/fifo"',
        "host": '[coordinator]\naddress = "a..b:7443"\n' + f'ca_pem = """{CA}"""',
    }
    sources = []
    for name, text in texts.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        sources.append((name, path))
    return sources


def test_hostile_input_is_invalid_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, source in _hostile_sources(tmp_path):
        site = tmp_path / f"site-{name}"
        assert fleet_check.main(["install", str(source), str(site)]) == 4, name
        err = capsys.readouterr().err
        assert err.startswith(f"donor-app: fleet config rejected: {source}: "), name
        assert not site.exists(), name


@pytest.mark.parametrize("place", places(FLEET), ids=lambda p: ".".join(map(str, p)))
def test_every_hostile_value_is_valid_or_invalid_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], place: tuple[str | int, ...]
) -> None:
    """Each value of a valid fleet config replaced by the worst of each kind: the check
    passes (and what would land is TOML again) or exits 4 with one line."""
    prepare(tmp_path)
    source = tmp_path / "source.toml"
    for value in WORST:
        document = replaced(FLEET, place, value)
        assert isinstance(document, dict)
        source.write_bytes(toml(document, tmp_path))
        code = fleet_check.main(["check", str(source)])
        err = capsys.readouterr().err
        what = shown_value(value)
        if code == 0:
            data, _ = fleet_check.check(source)
            fleet, _, _ = fleet_check.landed(data, tmp_path / "site")
            assert tomllib.loads(fleet_check.dumps(fleet)) == fleet, what
        else:
            assert code == 4, (what, err)
            assert err.count("\n") == 1, (what, err)
            assert err.startswith(f"donor-app: fleet config rejected: {source}: "), (what, err)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checker as the installers carry it (installer/build-fleet-check)."""
    out = tmp_path_factory.mktemp("pyz") / "fleet-check.pyz"
    build = Path(__file__).resolve().parents[2] / "installer" / "build-fleet-check"
    subprocess.run([str(build), str(out)], check=True, env={**os.environ, "PYTHON": sys.executable})
    return out


def test_the_packed_checker_answers_hostile_input_with_one_line(tmp_path: Path, pyz: Path) -> None:
    """Run as an installer runs it: exit 4 and one line on stderr, never a traceback."""
    for name, source in _hostile_sources(tmp_path):
        # -S: no site-packages, so only what the zipapp carries is importable.
        done = subprocess.run(
            [sys.executable, "-S", str(pyz), "check", str(source)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 4, (name, done.stderr[-2000:])
        assert done.stderr.count("\n") == 1, (name, done.stderr[-2000:])
        assert done.stderr.startswith("donor-app: fleet config rejected: "), name


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet_check.main(["check"]) == 2
    assert "usage" in capsys.readouterr().err


def test_the_writer_round_trips_what_a_fleet_file_holds() -> None:
    import datetime as dt

    data = {
        "s": 'a "b" \\ c\u0001',
        "n": 1.5,
        "i": 3,
        "b": True,
        "t": dt.time(9, 30),
        "d": dt.datetime(2025, 1, 6, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        "l": ["mon", "tue"],
        "odd key": 1,
        "table": {"x": 1, "nested": {"y": "z"}},
        "items": [{"a": 1}, {"a": 2}],
    }
    assert tomllib.loads(fleet_check.dumps(data)) == data
