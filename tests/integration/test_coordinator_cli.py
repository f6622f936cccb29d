"""`donor-coordinator`'s admin subcommands against a running coordinator: what an admin
types, what it prints, its exit codes, and one line (no traceback) for a mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.coordinator_helpers import RunningCoordinator, enroll, running_coordinator


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "donor_app.coordinator.cli", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_token_workload_and_donor_commands(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    data = coordinator.data_dir
    made = _cli(data, "token", "create", "--ttl", "30m", "--uses", "2", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["uses"] == 2 and token["token"].startswith("dtk_")
    donor = enroll(coordinator, token["token"], hostname="desk-7")

    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\x7fELF not really" * 100)
    submitted = _cli(data, "workload", "submit", "--name", "job-1", "--kernel", str(kernel))
    assert submitted.returncode == 0, submitted.stderr
    workload_id = submitted.stdout.strip()

    listed = json.loads(_cli(data, "workload", "list", "--json").stdout)
    assert [(w["id"], w["name"], w["state"]) for w in listed] == [(workload_id, "job-1", "queued")]
    table = _cli(data, "workload", "list").stdout
    assert "job-1" in table and "queued" in table

    donors = json.loads(_cli(data, "--json", "donor", "list").stdout)
    assert [(d["id"], d["hostname"]) for d in donors] == [(donor.donor_id, "desk-7")]
    drained = json.loads(_cli(data, "donor", "drain", donor.donor_id, "--json").stdout)
    assert drained[0]["flags"] == ["drained"]
    revoked = json.loads(_cli(data, "donor", "revoke", donor.donor_id, "--json").stdout)
    assert "revoked" in revoked[0]["flags"]

    cancelled = json.loads(_cli(data, "workload", "cancel", workload_id, "--json").stdout)
    assert cancelled[0]["state"] == "cancelled"


def test_mistakes_are_one_line_with_the_right_exit_code(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    refused = _cli(coordinator.data_dir, "donor", "revoke", "d-nobody")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "donor-coordinator: id: no donor d-nobody"

    usage = _cli(coordinator.data_dir, "workload", "submit", "--name", "x")
    assert usage.returncode == 2
    assert "give --kernel" in usage.stderr and "Traceback" not in usage.stderr

    nowhere = _cli(tmp_path / "never-ran", "donor", "list")
    assert nowhere.returncode == 2
    assert "no coordinator has run with data dir" in nowhere.stderr

    bad_ttl = _cli(coordinator.data_dir, "token", "create", "--ttl", "soon")
    assert bad_ttl.returncode == 2
    assert "not a duration" in bad_ttl.stderr


def test_an_unreachable_coordinator_is_named(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    with running_coordinator(data):
        pass  # it ran (endpoints.json, credentials) and stopped
    result = _cli(data, "donor", "list")
    assert result.returncode == 1
    assert "cannot reach the coordinator at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
