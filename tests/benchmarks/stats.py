"""Percentiles for the benchmarks' JSON (nearest-rank, as their targets' p50/p99 mean)."""

from __future__ import annotations

import statistics


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def p50_p99(samples: list[float], scale: float = 1.0, digits: int = 2) -> dict[str, float]:
    """{"p50", "p99"} of `samples` times `scale` (e.g. 1000 for seconds → ms)."""
    return {
        "p50": round(statistics.median(samples) * scale, digits),
        "p99": round(percentile(samples, 99) * scale, digits),
    }
