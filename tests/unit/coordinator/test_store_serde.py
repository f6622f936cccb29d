"""VmSpec <-> JSON as the fleet store keeps it (donor_app.coordinator.store.rows)."""

from __future__ import annotations

import json

import pytest

from donor_app.coordinator.store.rows import (
    vmspec_from_dict,
    vmspec_from_json,
    vmspec_to_dict,
    vmspec_to_json,
)
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec

SHA_A = "a" * 64
SHA_B = "b" * 64

SPECS = [
    VmSpec(name="k", vcpus=1, memory_mib=128, boot=KernelBoot(kernel_sha256=SHA_A)),
    VmSpec(
        name="kernel-initrd",
        vcpus=64,
        memory_mib=1024 * 1024,
        boot=KernelBoot(kernel_sha256=SHA_A, initrd_sha256=SHA_B, cmdline='console=ttyS0 a="b"'),
        network=True,
        arch="aarch64",
    ),
    VmSpec(name="disk", vcpus=2, memory_mib=512, boot=DiskBoot(disk_sha256=SHA_B)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_round_trip(spec: VmSpec) -> None:
    assert vmspec_from_json(vmspec_to_json(spec)) == spec
    assert vmspec_from_dict(vmspec_to_dict(spec)) == spec


def test_json_is_canonical_and_tagged() -> None:
    text = vmspec_to_json(SPECS[2])
    assert text == (
        '{"arch":"x86_64","boot":{"disk_sha256":"' + SHA_B + '","kind":"disk"},'
        '"memory_mib":512,"name":"disk","network":false,"vcpus":2}'
    )
    assert json.loads(vmspec_to_json(SPECS[0]))["boot"] == {
        "kind": "kernel",
        "kernel_sha256": SHA_A,
        "initrd_sha256": None,
        "cmdline": "console=ttyS0",
    }


def test_optional_fields_take_the_defaults() -> None:
    data = {
        "name": "g",
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {"kind": "kernel", "kernel_sha256": SHA_A},
    }
    assert vmspec_from_dict(data) == VmSpec(
        name="g", vcpus=1, memory_mib=256, boot=KernelBoot(kernel_sha256=SHA_A)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "invalid JSON"),
        ("[1, 2]", "not an object"),
        ('{"name": "g", "vcpus": 1, "memory_mib": 256}', "boot"),
        ('{"name": "g", "vcpus": 1, "memory_mib": 256, "boot": {"kind": "pxe"}}', "boot.kind"),
        ('{"name": "g", "vcpus": 1, "memory_mib": 256, "boot": {"kind": "disk"}}', "disk_sha256"),
        ('{"name": "g", "vcpus": 1, "memory_mib": 256, "boot": "x"}', "not a VmSpec"),
        (
            '{"name": "g", "vcpus": 0, "memory_mib": 256,'
            ' "boot": {"kind": "disk", "disk_sha256": "' + SHA_A + '"}}',
            "vcpus",
        ),
        (
            '{"name": "g", "vcpus": 1, "memory_mib": 256,'
            ' "boot": {"kind": "disk", "disk_sha256": "XYZ"}}',
            "disk_sha256",
        ),
    ],
)
def test_bad_json_is_a_value_error_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vmspec_from_json(text)
