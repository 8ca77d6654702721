"""Paired comparison across seeds: method minus LoRA for the same seed (same initialisation and
batches), a 95% t-interval of the mean difference and the paired t-test's two-sided p-value."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class PairedDifference:
    mean: float
    low: float
    high: float
    p_value: float
    n: int


def paired_difference(values, baseline, confidence: float = 0.95) -> PairedDifference:
    from scipy import stats

    if len(values) != len(baseline):
        raise ValueError(f"paired samples need equal lengths, got {len(values)} and {len(baseline)}")
    diffs = [v - b for v, b in zip(values, baseline)]
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {n}")
    mean = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / math.sqrt(n)
    if stderr == 0.0:  # identical runs (e.g. sigma 0): no spread, the difference is exact
        return PairedDifference(mean, mean, mean, 1.0 if mean == 0 else 0.0, n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * stderr
    p_value = 2 * stats.t.sf(abs(mean) / stderr, n - 1)
    return PairedDifference(mean, mean - half, mean + half, float(p_value), n)


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval (for plots)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, 0.0
    return mean, stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
