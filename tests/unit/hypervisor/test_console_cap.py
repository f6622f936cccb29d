"""A guest's console file kept under its cap (consoles.py); the guest writing it is real in
tests/integration (test_hypervisor_contract.py, test_migration_libvirt.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from donor_app.hypervisor.consoles import ConsoleCap, check_max_bytes, trim
from donor_app.hypervisor.guest_files import GuestFiles
from donor_app.hypervisor.images import ImageCache
from tests.waiting import wait_for


def test_a_console_past_its_cap_moves_to_the_backup_and_starts_again(tmp_path: Path):
    console = tmp_path / "console.log"
    console.write_bytes(b"a" * 5000)
    assert not trim(console, 5000)  # at the cap, not past it
    # The guest's QEMU writes in append mode: after the trim, at the start of the file.
    with console.open("ab") as guest:
        guest.write(b"b" * 100)
        guest.flush()
        assert trim(console, 5000)
        guest.write(b"c\n")
    assert console.read_bytes() == b"c\n"
    backup = tmp_path / "console.log.0"
    assert backup.read_bytes() == b"a" * 5000 + b"b" * 100
    assert backup.stat().st_mode & 0o777 == 0o600  # the guest's output is its own
    assert not (tmp_path / "console.log.0.part").exists()


def test_a_link_or_a_missing_file_is_left_alone(tmp_path: Path):
    target = tmp_path / "precious"
    target.write_bytes(b"x" * 10_000)
    link = tmp_path / "console.log"
    link.symlink_to(target)
    assert not trim(link, 4096)
    assert target.read_bytes() == b"x" * 10_000
    assert not trim(tmp_path / "gone.log", 4096)


@pytest.mark.parametrize("bad", [0, 4095, -1, True, 1.5e6, "2M"])
def test_a_cap_below_a_page_or_not_a_whole_number_is_refused(bad: object):
    with pytest.raises(ValueError, match="console_max_bytes"):
        check_max_bytes(bad)  # type: ignore[arg-type]


def test_every_guest_console_is_looked_at(tmp_path: Path):
    files = GuestFiles(tmp_path / "state", ImageCache(tmp_path / "images"))
    for guest in ("g1", "g2"):
        files.make_guest_dir(guest)
        files.console_path(guest).write_bytes(b"z" * 9000)
    cap = ConsoleCap(files, 4096)
    try:
        wait_for(
            lambda: all(os.path.getsize(files.console_path(g)) == 0 for g in ("g1", "g2")),
            5,
            "both consoles to be trimmed",
        )
    finally:
        cap.close()
