"""The statistics behind `query --group-by` and `--paired`: intervals for a mean and for a difference of
paired proportions, and McNemar's exact test. Plain Python (no scipy), checked against tabulated values."""
from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Sequence


def t_quantile(p: float, df: int) -> float:
    """Student t quantile (exact for df 1 and 2, Cornish-Fisher expansion beyond)."""
    if df <= 0:
        return math.nan
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, low, high) with a t interval for the mean; nan where undefined."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: binomial test of b successes in b + c at 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**m)))


def paired_difference_ci(n11: int, n10: int, n01: int, n00: int, level: float = 0.95) -> tuple[float, float]:
    """Agresti-Min adjusted Wald interval for a difference of paired proportions."""
    n = n11 + n10 + n01 + n00
    if n == 0:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    nn = n + 2
    p10, p01 = (n10 + 0.5) / nn, (n01 + 0.5) / nn
    diff = p10 - p01
    se = math.sqrt(max(p10 + p01 - diff**2, 0.0) / nn)
    return max(-1.0, diff - z * se), min(1.0, diff + z * se)
