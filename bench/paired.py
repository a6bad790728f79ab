"""Ratios of step times from interleaved rounds, with their spread.

On a shared or 2-core machine a step's time drifts by more than the differences a benchmark
looks for, and drift hits the modes that ran close together alike. So each round times every
mode once, the ratio is taken within the round, and the figure is the median over rounds, with
the quartiles of the per-round ratios and a distribution-free 95 % interval of that median (order
statistics, from the binomial(n, 1/2): no assumption on the shape of the noise).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The narrowest pair of order statistics (x[j], x[n-1-j]) that holds the true median with
    probability ≥ `level` (exact, binomial(n, 1/2)); the whole range where none does (n < 6)."""
    xs = sorted(values)
    n = len(xs)

    def coverage(j: int) -> float:  # P(x[j] ≤ median ≤ x[n-1-j]) = P(j < Binomial(n, 1/2) < n - j)
        return sum(math.comb(n, i) for i in range(j + 1, n - j)) / 2**n

    j = 0
    while 2 * (j + 1) < n - 1 and coverage(j + 1) >= level:
        j += 1
    return xs[j], xs[n - 1 - j]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and the median's 95 % interval of per-round values."""
    xs = list(values)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    lo, hi = median_interval(xs)
    return {"paired": statistics.median(xs), "q1": q1, "q3": q3, "ci95_lo": lo, "ci95_hi": hi, "rounds": len(xs)}


def per_round(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[r] / den[r] for every round r."""
    return [a / b for a, b in zip(num, den, strict=True)]


def ratio_figures(times: dict[str, list[float]], cpu_times: dict[str, list[float]], num: str, den: str
                  ) -> dict[str, float]:
    """num / den: the median of per-round ratios (`paired`, the target figure) with its spread,
    and, for comparison, the ratio of medians, of bests and of median CPU times."""
    return {**summary(per_round(times[num], times[den])),
            "of_medians": statistics.median(times[num]) / statistics.median(times[den]),
            "best": min(times[num]) / min(times[den]),
            "cpu": statistics.median(cpu_times[num]) / statistics.median(cpu_times[den])}


def gap_figures(times: dict[str, list[float]], a: tuple[str, str], b: tuple[str, str]) -> dict[str, float]:
    """(a[0] / a[1]) − (b[0] / b[1]), round by round (all four modes ran in each round): the median
    difference of the two ratios, with its spread."""
    return summary([x - y for x, y in zip(per_round(times[a[0]], times[a[1]]), per_round(times[b[0]], times[b[1]]),
                                          strict=True)])
