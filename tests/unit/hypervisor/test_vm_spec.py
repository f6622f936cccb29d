"""VmSpec refuses bad fields by name and range before anything reaches libvirt."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from donor_app.domain.vm import NAME_PATTERN, DiskBoot, KernelBoot, VmSpec

SHA = "a" * 64


def spec(**overrides: object) -> VmSpec:
    fields: dict[str, object] = {
        "name": "guest-1",
        "vcpus": 1,
        "memory_mib": 256,
        "boot": KernelBoot(SHA),
    }
    fields.update(overrides)
    return VmSpec(**fields)  # type: ignore[arg-type]


def test_a_valid_spec_is_accepted():
    made = spec(network=True, boot=DiskBoot(SHA))
    assert made.name == "guest-1" and made.network


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "", "name: ''"),
        ("name", "Upper", "name: 'Upper'"),
        ("name", "-lead", "name: '-lead'"),
        ("name", "a" * 64, "1–63 characters"),
        ("name", "semi;colon", "name: 'semi;colon'"),
        ("name", "../etc", "name: '../etc'"),
        ("vcpus", 0, "vcpus: 0 is outside the allowed range 1–64"),
        ("vcpus", -2, "vcpus: -2 is outside the allowed range 1–64"),
        ("vcpus", 65, "vcpus: 65 is outside the allowed range 1–64"),
        ("vcpus", True, "vcpus: True"),
        ("vcpus", 1.5, "vcpus: 1.5"),
        ("memory_mib", 0, "memory_mib: 0 is outside the allowed range 128–1048576 MiB"),
        ("memory_mib", 64, "memory_mib: 64 is outside"),
        ("memory_mib", -256, "memory_mib: -256 is outside"),
        ("memory_mib", 2**40, "memory_mib: 1099511627776 is outside"),
        ("arch", "sparc", "arch: 'sparc'"),
        ("network", "yes", "network: 'yes'"),
        ("boot", "kernel", "boot: must be"),
    ],
)
def test_bad_fields_are_named_with_the_allowed_range(field: str, value: object, message: str):
    with pytest.raises(ValueError) as caught:
        spec(**{field: value})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KernelBoot("abc"), "boot.kernel_sha256"),
        (lambda: KernelBoot(SHA.upper()), "boot.kernel_sha256"),
        (lambda: KernelBoot(SHA, "x"), "boot.initrd_sha256"),
        (lambda: KernelBoot(SHA, None, "console=ttyS0\nrm -rf"), "boot.cmdline"),
        (lambda: KernelBoot(SHA, None, "x" * 2000), "boot.cmdline"),
        (lambda: DiskBoot("../../disk"), "boot.disk_sha256"),
    ],
)
def test_bad_boot_fields_are_named(make: object, message: str):
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@given(st.text(max_size=80))
def test_only_names_matching_the_pattern_are_accepted(name: str):
    if NAME_PATTERN.fullmatch(name):
        assert spec(name=name).name == name
    else:
        with pytest.raises(ValueError, match="name: "):
            spec(name=name)
