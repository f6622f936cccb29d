"""Reconnect delays (pure)."""

from __future__ import annotations

import pytest

from donor_app.gui.backoff import Backoff


def middle(low: float, high: float) -> float:
    return (low + high) / 2


def test_delays_double_up_to_the_maximum_and_reset() -> None:
    backoff = Backoff(initial_s=0.5, factor=2, maximum_s=4, uniform=middle)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_jitter_stays_within_its_fraction() -> None:
    backoff = Backoff(initial_s=1, maximum_s=1, jitter=0.2)
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    "kwargs", [{"initial_s": 0}, {"initial_s": 5, "maximum_s": 1}, {"factor": 0.5}, {"jitter": 1}]
)
def test_nonsense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]
