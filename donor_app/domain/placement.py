"""Where the coordinator puts workloads: pure choices over offers and demands.

A donor offers what its owner's policy lets it lend now (CPU as a share of the host,
RAM) minus what it already runs for the fleet. Among donors with room, the one expected
to stay idle longest wins: first the donor's own forecast (`lend_until`, unset = no end
expected), then its history (how often it was idle in this hour of the week), then the
most free room (spreading load). Deterministic for equal inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

# Placement needs a little headroom: a guest's vCPU saturating its share plus QEMU's own
# overhead must not push the donor past its owner's cap.
_MEMORY_OVERHEAD_MIB = 32


@dataclass(frozen=True, slots=True)
class Demand:
    """A workload waiting for a donor."""

    workload_id: str
    vcpus: int
    memory_mib: int
    arch: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Offer:
    """A connected donor's room. `free_cpus` is in cores (may be fractional)."""

    donor_id: str
    arch: str
    free_cpus: float
    free_memory_mib: int
    lend_until: datetime | None = None
    idle_ratio: float | None = None  # None: never seen in this hour of the week

    def fits(self, demand: Demand) -> bool:
        # A guest may get less CPU than its vCPUs (its cap follows the owner's policy),
        # but a donor must offer at least one core's share per placement: a 1-vCPU
        # guest on a donor lending 10 % of a core would crawl.
        return (
            self.arch == demand.arch
            and self.free_cpus >= min(demand.vcpus, 1.0)
            and self.free_memory_mib >= demand.memory_mib + _MEMORY_OVERHEAD_MIB
        )

    def after(self, demand: Demand) -> Offer:
        return replace(
            self,
            free_cpus=max(0.0, self.free_cpus - demand.vcpus),
            free_memory_mib=self.free_memory_mib - demand.memory_mib - _MEMORY_OVERHEAD_MIB,
        )


def offer_from_capacity(
    donor_id: str,
    *,
    arch: str,
    cores: int,
    lend_cpu_percent: float,
    lend_memory_mib: int,
    held: Iterable[Demand],
    lend_until: datetime | None = None,
    idle_ratio: float | None = None,
) -> Offer:
    """A donor's offer: what it may lend minus what it already holds."""
    held = list(held)
    return Offer(
        donor_id=donor_id,
        arch=arch,
        free_cpus=cores * lend_cpu_percent / 100.0 - sum(d.vcpus for d in held),
        free_memory_mib=lend_memory_mib - sum(d.memory_mib + _MEMORY_OVERHEAD_MIB for d in held),
        lend_until=lend_until,
        idle_ratio=idle_ratio,
    )


def _preference(offer: Offer) -> tuple[float, float, float, float, str]:
    # Sorted ascending, so every "more is better" figure is negated.
    until = offer.lend_until.timestamp() if offer.lend_until is not None else float("inf")
    ratio = offer.idle_ratio if offer.idle_ratio is not None else 0.5
    return (-until, -ratio, -offer.free_cpus, -float(offer.free_memory_mib), offer.donor_id)


def rank(offers: Iterable[Offer], demand: Demand) -> list[Offer]:
    """Offers that fit `demand`, best first."""
    return sorted((o for o in offers if o.fits(demand)), key=_preference)


def place(demands: Sequence[Demand], offers: Sequence[Offer]) -> dict[str, str]:
    """workload_id → donor_id for every demand that fits somewhere.

    Higher priority first (then the given order, e.g. oldest first); each placement
    uses up room on its donor before the next is decided.
    """
    room = {o.donor_id: o for o in offers}
    placed: dict[str, str] = {}
    ordered = sorted(enumerate(demands), key=lambda item: (-item[1].priority, item[0]))
    for _, demand in ordered:
        best = rank(room.values(), demand)
        if best:
            chosen = best[0]
            placed[demand.workload_id] = chosen.donor_id
            room[chosen.donor_id] = chosen.after(demand)
    return placed


def evacuation_target(demand: Demand, offers: Sequence[Offer], source_donor_id: str) -> str | None:
    """The donor to move a reclaimed workload to, or None: checkpoint it instead."""
    best = rank((o for o in offers if o.donor_id != source_donor_id), demand)
    return best[0].donor_id if best else None


def hour_of_week(at: datetime) -> int:
    """0 = Monday 00:00–01:00 (in `at`'s time zone) ... 167 = Sunday 23:00–24:00."""
    return at.weekday() * 24 + at.hour
