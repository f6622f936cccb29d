"""Reconnect delays: exponential with jitter, capped, reset after a success."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays `initial_s`, ×`factor` each failure, at most `maximum_s`, each ±`jitter`
    (a fraction) so several clients do not retry in lockstep. `uniform` is injectable."""

    def __init__(
        self,
        initial_s: float = 0.5,
        factor: float = 2.0,
        maximum_s: float = 10.0,
        jitter: float = 0.2,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not 0 < initial_s <= maximum_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff: need 0 < initial ≤ maximum, factor ≥ 1, 0 ≤ jitter < 1")
        self._initial = initial_s
        self._factor = factor
        self._maximum = maximum_s
        self._jitter = jitter
        self._uniform = uniform
        self._next = initial_s

    def next_delay(self) -> float:
        """The delay before the next attempt (grows with each call)."""
        base = self._next
        self._next = min(self._next * self._factor, self._maximum)
        return base * self._uniform(1 - self._jitter, 1 + self._jitter)

    def reset(self) -> None:
        """After a success: start again from `initial_s`."""
        self._next = self._initial
