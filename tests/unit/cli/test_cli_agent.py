"""donor-agent's command line: every option reaches the agent's options; mistakes exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from donor_app.cli import _agent_options, _agent_parser


def test_every_option_reaches_the_agent_options(tmp_path: Path):
    args = _agent_parser().parse_args(
        [
            "--config", str(tmp_path / "c" / "settings.toml"),
            "--fleet-config", str(tmp_path / "f" / "fleet.toml"),
            "--data-dir", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "cache"),
            "--libvirt-uri", "test:///default",
            "--socket", str(tmp_path / "run" / "a.sock"),
            "--socket-owner", "1000",
            "--watch-input", "off",
            "--virt-type", "qemu",
            "--demo-kernel", "/k", "--demo-initrd", "/i",
            "--demo-guests", "2", "--demo-mode", "sleep",
        ]
    )  # fmt: skip
    options = _agent_options(args)
    assert options.settings_file == tmp_path / "c" / "settings.toml"
    assert options.fleet_file == tmp_path / "f" / "fleet.toml"
    assert options.paths.data_dir == tmp_path / "data"
    assert options.paths.cache_dir == tmp_path / "cache"
    assert options.libvirt_uri == "test:///default"
    assert options.socket == tmp_path / "run" / "a.sock"
    assert options.socket_owner_uid == 1000
    assert options.watch_input == "off"
    assert options.virt_type == "qemu"
    assert (options.demo_kernel, options.demo_initrd) == (Path("/k"), Path("/i"))
    assert (options.demo_guests, options.demo_mode) == (2, "sleep")


@pytest.mark.parametrize(
    "argv", [["--demo-guests", "0"], ["--watch-input", "maybe"], ["--log-level", "LOUD"]]
)
def test_bad_options_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        _agent_parser().parse_args(argv)
    assert caught.value.code == 2
    assert argv[0] in capsys.readouterr().err
