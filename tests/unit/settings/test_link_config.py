"""The fleet file's [coordinator] table: what it needs, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from donor_app.settings.config import ConfigError, load_fleet, load_link_config

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _fleet(tmp_path: Path, body: str) -> Path:
    file = tmp_path / "fleet.toml"
    file.write_text(body)
    return file


def test_no_table_means_no_coordinator(tmp_path: Path) -> None:
    assert load_link_config(_fleet(tmp_path, "max_cpu_percent = 50\n")) is None
    assert load_link_config(tmp_path / "missing.toml") is None


def test_a_complete_table_with_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(PEM)
    (tmp_path / "token").write_text("dtk_abc_def\n")
    file = _fleet(
        tmp_path,
        f'max_cpu_percent = 50\n[coordinator]\naddress = "coord.example.org:7443"\n'
        f'ca_file = "{tmp_path / "ca.pem"}"\ntoken_file = "{tmp_path / "token"}"\n',
    )
    config = load_link_config(file)
    assert config is not None
    assert config.enroll_address == "coord.example.org:7444"
    assert (config.token, config.token_file, config.ca_pem) == (
        "dtk_abc_def",
        tmp_path / "token",
        PEM.encode(),
    )
    assert load_fleet(file).max_cpu_percent == 50  # the policy parser accepts the table


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('address = "no-port"\nca_pem = "x"', "coordinator.address"),
        ('address = "h:7443"', "coordinator.ca_file"),
        ('address = "h:7443"\nca_pem = "not a pem"', "coordinator.ca_pem"),
        ('address = "h:7443"\nca_file = "/nonexistent/ca.pem"', "coordinator.ca_file"),
        (
            'address = "h:7443"\nca_pem = "x"\nenroll_address = "h:99999"',
            "coordinator.enroll_address",
        ),
        ('address = "h:7443"\nca_pem = "x"\ncolour = "red"', "coordinator.colour"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_link_config(_fleet(tmp_path, f"[coordinator]\n{body}\n"))
    assert caught.value.key == key
