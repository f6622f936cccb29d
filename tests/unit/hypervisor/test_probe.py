"""Choosing kvm or qemu: by CPU flags and /dev/kvm, with an override."""

from __future__ import annotations

from pathlib import Path

import pytest

from donor_app.hypervisor.probe import choose_virt_type, cpu_has_virtualization

NO_VT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae sse2 hypervisor\n"
WITH_VMX = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n"


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    return device


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_flags_are_read_from_the_flags_line():
    assert cpu_has_virtualization(WITH_VMX)
    assert cpu_has_virtualization("flags : svm lm")
    assert not cpu_has_virtualization(NO_VT)
    assert not cpu_has_virtualization("model name : vmx-lookalike cpu\nflags : sse")


def test_dev_kvm_without_cpu_support_means_tcg(tmp_path: Path, kvm_device: Path, monkeypatch):
    monkeypatch.delenv("DONOR_VIRT_TYPE", raising=False)
    cpuinfo = _cpuinfo(tmp_path, NO_VT)
    assert choose_virt_type("qemu:///system", cpuinfo_path=cpuinfo, kvm_device=kvm_device) == (
        "qemu"
    )


def test_kvm_needs_both_the_cpu_and_the_device(tmp_path: Path, kvm_device: Path, monkeypatch):
    monkeypatch.delenv("DONOR_VIRT_TYPE", raising=False)
    cpuinfo = _cpuinfo(tmp_path, WITH_VMX)
    assert choose_virt_type("qemu:///system", cpuinfo_path=cpuinfo, kvm_device=kvm_device) == (
        "kvm"
    )
    missing = tmp_path / "no-kvm"
    assert choose_virt_type("qemu:///system", cpuinfo_path=cpuinfo, kvm_device=missing) == ("qemu")


def test_override_wins_and_is_validated(tmp_path: Path, kvm_device: Path, monkeypatch):
    cpuinfo = _cpuinfo(tmp_path, NO_VT)
    assert choose_virt_type("qemu:///system", "kvm", cpuinfo_path=cpuinfo) == "kvm"
    monkeypatch.setenv("DONOR_VIRT_TYPE", "qemu")
    assert (
        choose_virt_type(
            "qemu:///system", cpuinfo_path=_cpuinfo(tmp_path, WITH_VMX), kvm_device=kvm_device
        )
        == "qemu"
    )
    with pytest.raises(ValueError, match="DONOR_VIRT_TYPE: 'xen'"):
        choose_virt_type("qemu:///system", "xen")


def test_the_test_driver_gets_test_domains(monkeypatch):
    monkeypatch.delenv("DONOR_VIRT_TYPE", raising=False)
    assert choose_virt_type("test:///default") == "test"
