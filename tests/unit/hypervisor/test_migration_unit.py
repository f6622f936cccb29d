"""Live migration's logic without daemons: its options, where a guest is left when
libvirt fails late (fakes of the two libvirt objects migration.py uses), and rewriting
another host's domain XML for this one.

Real daemons cannot be made to fail between QEMU's switch-over and libvirt's last step
on demand; the fakes can. The moves themselves, between two real libvirtd, are in
tests/integration/test_migration_libvirt.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import libvirt
import pytest

from donor_app.domain.guest import GuestState
from donor_app.hypervisor.migration import (
    MigrationError,
    MigrationOptions,
    MigrationOutcome,
    MigrationTarget,
    migrate_live,
)
from donor_app.hypervisor.xml import BootFiles, build_domain_xml, retarget_domain_xml
from tests.guests import tiny_guest_spec

LOOPBACK = "tcp://127.0.0.1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bandwidth_mibps", -1),
        ("bandwidth_mibps", 100_001),
        ("bandwidth_mibps", True),
        ("bandwidth_mibps", 2.5),
        ("max_downtime_ms", 0),
        ("max_downtime_ms", 60_001),
        ("max_downtime_ms", "100"),
        ("deadline_s", 0),
        ("deadline_s", -5.0),
        ("deadline_s", math.inf),
        ("deadline_s", math.nan),
        ("deadline_s", 100_000),
        ("tls", "yes"),
    ],
)
def test_bad_migration_options_name_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        MigrationOptions(**{field: value})  # type: ignore[arg-type]


# --- where the guest is left when libvirt fails late -------------------------------------
# The fakes hold just what migration.py asks of a libvirt domain and connection.

_RUNNING, _PAUSED = libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED


class FakeDomain:
    def __init__(
        self,
        state: int | None,
        calls: list[str],
        *,
        pause_on_migrate: bool = False,
        virt_type: str = "qemu",
        qemu_version: int = 7_002_000,
    ):
        self.code = state  # None: libvirt no longer has it
        self.calls = calls
        self.pause_on_migrate = pause_on_migrate
        self.virt_type = virt_type
        self.qemu_version = qemu_version
        self.migrate_flags: list[int] = []

    def connect(self) -> FakeConnection:
        return FakeConnection(None, self.qemu_version)

    def name(self) -> str:
        return "donor-fake"

    def state(self) -> list[int]:
        if self.code is None:
            raise libvirt.libvirtError("no domain")
        return [self.code, 0]

    def isActive(self) -> bool:  # noqa: N802 (libvirt's name)
        return self.code is not None

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return (
            f"<domain type='{self.virt_type}'><name>donor-fake</name>"
            "<os><kernel>/a/k</kernel></os></domain>"
        )

    def migrateSetMaxDowntime(self, _ms: int, _flags: int) -> None:  # noqa: N802
        pass

    def jobStats(self, _flags: int = 0) -> dict[str, int]:  # noqa: N802
        return {"type": libvirt.VIR_DOMAIN_JOB_NONE, "downtime": 7, "data_processed": 1 << 20}

    def migrate3(self, _conn: object, _params: object, flags: int) -> None:
        self.migrate_flags.append(flags)
        if self.pause_on_migrate:
            self.code = _PAUSED
        raise libvirt.libvirtError("Confirm failed")

    def resume(self) -> None:
        self.calls.append("resume source")
        self.code = _RUNNING

    def destroy(self) -> None:
        self.calls.append("destroy target copy")
        self.code = None


class FakeConnection:
    def __init__(self, dom: FakeDomain | None, version: int = 7_002_000):
        self.dom = dom
        self.version = version

    def getVersion(self) -> int:  # noqa: N802
        return self.version

    def lookupByName(self, _name: str) -> FakeDomain:  # noqa: N802
        if self.dom is None or self.dom.code is None:
            raise libvirt.libvirtError("no domain")
        return self.dom

    def close(self) -> None:
        pass


def _fake_migration(
    monkeypatch: pytest.MonkeyPatch, source: FakeDomain, at_target: FakeDomain | None
) -> MigrationOutcome:
    monkeypatch.setattr(libvirt, "open", lambda _uri: FakeConnection(at_target))
    target = MigrationTarget(
        "test:///target", LOOPBACK, BootFiles(kernel=Path("/b/k")), Path("/b/c")
    )
    return migrate_live(source, "fake", target, MigrationOptions())


@pytest.mark.parametrize(
    ("source_before", "target_copy", "source_after", "calls"),
    [
        # Nothing at the target: the guest that was running runs again at the source.
        (_RUNNING, None, GuestState.RUNNING, ["resume source"]),
        # A paused copy at the target never ran: it goes, the source runs on.
        (_RUNNING, _PAUSED, GuestState.RUNNING, ["destroy target copy", "resume source"]),
        # A running copy at the target may be the guest now: never two running copies.
        (_RUNNING, _RUNNING, GuestState.PAUSED, []),
        # A guest the owner had paused stays paused.
        (_PAUSED, None, GuestState.PAUSED, []),
    ],
)
def test_after_a_late_failure_the_guest_runs_exactly_once(
    monkeypatch: pytest.MonkeyPatch,
    source_before: int,
    target_copy: int | None,
    source_after: GuestState,
    calls: list[str],
):
    made: list[str] = []
    source = FakeDomain(source_before, made, pause_on_migrate=True)
    copy = FakeDomain(target_copy, made) if target_copy is not None else None
    with pytest.raises(MigrationError, match="failed after .*: Confirm failed") as caught:
        _fake_migration(monkeypatch, source, copy)
    assert caught.value.source_state is source_after
    assert made == calls


def test_a_guest_gone_from_the_source_and_running_at_the_target_has_moved(
    monkeypatch: pytest.MonkeyPatch,
):
    made: list[str] = []
    source = FakeDomain(_RUNNING, made)
    copy = FakeDomain(_RUNNING, made)

    def migrate_then_fail(_conn: object, _params: object, _flags: int) -> None:
        source.code = None  # libvirt undefined it here, then reported an error
        raise libvirt.libvirtError("Confirm failed")

    source.migrate3 = migrate_then_fail  # type: ignore[method-assign]
    outcome = _fake_migration(monkeypatch, source, copy)
    assert outcome.downtime_ms == 7
    assert made == []


@pytest.mark.parametrize(
    ("virt_type", "qemu_version", "live"),
    [("kvm", 7_002_000, True), ("qemu", 7_002_000, False), ("qemu", 9_000_000, True)],
)
def test_a_tcg_guest_moves_paused_where_qemu_would_lose_its_writes(
    monkeypatch: pytest.MonkeyPatch, virt_type: str, qemu_version: int, live: bool
):
    source = FakeDomain(_RUNNING, [], virt_type=virt_type, qemu_version=qemu_version)
    with pytest.raises(MigrationError):
        _fake_migration(monkeypatch, source, None)
    [flags] = source.migrate_flags
    assert bool(flags & libvirt.VIR_MIGRATE_LIVE) is live
    assert flags & libvirt.VIR_MIGRATE_PERSIST_DEST
    assert flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


# --- rewriting another host's domain XML ---------------------------------------------------


def _kernel_guest_xml(home: str) -> str:
    spec = tiny_guest_spec("x", ("a" * 64, "b" * 64))
    files = BootFiles(kernel=Path(f"{home}/images/k"), initrd=Path(f"{home}/images/i"))
    xml = build_domain_xml(
        spec,
        domain_name="donor-x",
        virt_type="qemu",
        files=files,
        console_log=Path(f"{home}/state/guests/x/console.log"),
    )
    # As libvirt gives it back: a uuid, and <console> repeating the serial port's file.
    return xml.replace(
        "<name>donor-x</name>",
        "<name>donor-x</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>",
    ).replace(
        "</devices>",
        f"<console type='file'><source path='{home}/state/guests/x/console.log'/>"
        f"<log file='{home}/state/guests/x/chardev.log'/><target type='serial'/></console>"
        "</devices>",
    )


def test_retargeting_changes_only_the_host_paths():
    there = _kernel_guest_xml("/there")
    files = BootFiles(kernel=Path("/here/images/k"), initrd=Path("/here/images/i"))
    here = retarget_domain_xml(
        there, domain_name="donor-x", files=files, console_log=Path("/here/c/console.log")
    )
    assert "/there" not in here
    assert "<kernel>/here/images/k</kernel>" in here
    assert "<initrd>/here/images/i</initrd>" in here
    assert here.count('path="/here/c/console.log"') == 2  # serial and console
    assert 'file="/here/c/chardev.log"' in here
    assert "1b4e28ba-2fa1-11d2-883f-0016d3cca427" in here
    # Everything else as it was: retargeting back gives the same document.
    back = retarget_domain_xml(
        here,
        domain_name="donor-x",
        files=BootFiles(kernel=Path("/there/images/k"), initrd=Path("/there/images/i")),
        console_log=Path("/there/state/guests/x/console.log"),
    )
    assert back == retarget_domain_xml(
        there,
        domain_name="donor-x",
        files=BootFiles(kernel=Path("/there/images/k"), initrd=Path("/there/images/i")),
        console_log=Path("/there/state/guests/x/console.log"),
    )


@pytest.mark.parametrize(
    ("domain_name", "files", "field"),
    [
        ("donor-y", BootFiles(kernel=Path("/k"), initrd=Path("/i")), "name"),
        ("donor-x", BootFiles(kernel=Path("/k")), "files.initrd"),
        ("donor-x", BootFiles(kernel=Path("/k"), initrd=Path("/i"), disk_overlay=Path("/d")),
         "files.disk_overlay"),
    ],
)  # fmt: skip
def test_retargeting_refuses_what_does_not_fit(domain_name: str, files: BootFiles, field: str):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        retarget_domain_xml(
            _kernel_guest_xml("/there"),
            domain_name=domain_name,
            files=files,
            console_log=Path("/c"),
        )
    with pytest.raises(ValueError, match=r"^xml: "):
        retarget_domain_xml("<domain", domain_name="donor-x", files=files, console_log=Path("/c"))
