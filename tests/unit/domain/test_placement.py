"""Placement: who fits, who is preferred, priorities, room used up as we go."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from donor_app.domain.placement import (
    Demand,
    Offer,
    evacuation_target,
    hour_of_week,
    offer_from_capacity,
    place,
    rank,
)

NOW = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)  # a Monday


def _offer(donor: str, cpus: float = 4, mib: int = 8192, **kw: object) -> Offer:
    return Offer(donor, "x86_64", cpus, mib, **kw)  # type: ignore[arg-type]


def _demand(name: str, vcpus: int = 1, mib: int = 256, priority: int = 0) -> Demand:
    return Demand(name, vcpus, mib, "x86_64", priority)


def test_a_donor_without_room_or_of_another_arch_is_not_chosen() -> None:
    offers = [
        _offer("small", mib=200),
        _offer("no-cpu", cpus=0.5),
        Offer("arm", "aarch64", 8, 8192),
        _offer("fits"),
    ]
    assert [o.donor_id for o in rank(offers, _demand("w"))] == ["fits"]


def test_the_donor_idle_longest_wins_then_history_then_room() -> None:
    soon = _offer("soon", cpus=8, lend_until=NOW + timedelta(minutes=10))
    later = _offer("later", cpus=1, lend_until=NOW + timedelta(hours=3))
    open_ended = _offer("open", cpus=1, lend_until=None, idle_ratio=0.1)
    habitual = _offer("habitual", cpus=1, lend_until=None, idle_ratio=0.9)
    ranked = rank([soon, later, open_ended, habitual], _demand("w"))
    assert [o.donor_id for o in ranked] == ["habitual", "open", "later", "soon"]


def test_priorities_first_and_room_is_used_up() -> None:
    offers = [_offer("only", cpus=2, mib=1024)]
    demands = [
        _demand("low", 1, 400),
        _demand("high", 1, 400, priority=5),
        _demand("third", 1, 400),
    ]
    assert place(demands, offers) == {"high": "only", "low": "only"}


def test_offers_subtract_what_a_donor_already_holds() -> None:
    offer = offer_from_capacity(
        "d", arch="x86_64", cores=4, lend_cpu_percent=50, lend_memory_mib=1024,
        held=[_demand("a", 1, 256)],
    )  # fmt: skip
    assert offer.free_cpus == 1.0
    assert offer.free_memory_mib == 1024 - 256 - 32


def test_evacuation_never_targets_the_source() -> None:
    offers = [_offer("source"), _offer("other", mib=100)]
    assert evacuation_target(_demand("w"), offers, "source") is None
    offers.append(_offer("target"))
    assert evacuation_target(_demand("w"), offers, "source") == "target"


def test_hour_of_week() -> None:
    assert hour_of_week(NOW) == 10
    assert hour_of_week(NOW + timedelta(days=6, hours=13)) == 167
