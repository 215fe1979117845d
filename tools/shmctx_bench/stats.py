"""Percentiles, medians and the paired ratios every figure of the benchmark is made of."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def pct(sorted_vals: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values (nearest rank); NaN when empty."""
    if not sorted_vals:
        return float("nan")
    return float(sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))])


def summary(samples: Iterable[float], overhead_ns: float = 0.0) -> dict:
    """Percentiles in µs of nanosecond samples, the cost of timing an empty call
    (``overhead_ns``) taken off each."""
    s = sorted(samples)
    n = len(s)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "median_us": max(0.0, pct(s, 0.5) - overhead_ns) / 1e3,
        "p99_us": max(0.0, pct(s, 0.99) - overhead_ns) / 1e3,
        "p999_us": max(0.0, pct(s, 0.999) - overhead_ns) / 1e3,
        "max_us": max(0.0, s[-1] - overhead_ns) / 1e3,
        "mean_us": max(0.0, sum(s) / n - overhead_ns) / 1e3,
    }


def median(vals: Iterable[float | None]) -> float:
    """Median of the values that are numbers (None and NaN left out); NaN if none is."""
    kept = [v for v in vals if v is not None and v == v]
    return statistics.median(kept) if kept else float("nan")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios: drift of a shared machine hits both sides alike."""
    return median([a / d for a, d in zip(num, den, strict=True) if d])
