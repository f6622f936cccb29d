"""Settings for the whole test run, and the fixtures several test packages share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
    from donor_app.coordinator.fleet import FleetConfig
    from tests.coordinator_helpers import RunningCoordinator

# Property tests assert logic, not speed: on a loaded 2-core CI machine input generation
# can be slow, which must not fail the run (benchmarks measure speed, tests do not).
settings.register_profile("donor", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("donor")


@pytest.fixture
def coordinator_fleet() -> FleetConfig | None:
    """The fleet timings of the `coordinator` fixture (None: the defaults). A test module
    that needs shorter leases or other limits overrides this fixture."""
    return None


@pytest.fixture
def coordinator(
    tmp_path: Path, coordinator_fleet: FleetConfig | None
) -> Iterator[RunningCoordinator]:
    """A real coordinator in this process (its own event-loop thread, ports chosen by the
    OS, SQLite under tmp_path)."""
    # Imported here: unit tests that never ask for a coordinator do not load its stack.
    from tests.coordinator_helpers import running_coordinator

    with running_coordinator(tmp_path / "coordinator", fleet=coordinator_fleet) as running:
        yield running


@pytest.fixture
def admin(coordinator: RunningCoordinator) -> Iterator[AdminClient]:
    """The coordinator's admin client (mTLS with the admin certificate)."""
    with coordinator.admin() as client:
        yield client
