"""Confidence intervals for accuracy figures measured on the same images.

An artifact and PyTorch are judged on the same images, so their top-1 accuracies are paired, not independent:
only the images whose correctness flipped (``lost``: PyTorch right, artifact wrong; ``gained``: the reverse)
carry information about the change. The interval for the change is Tango's score interval for a difference of
paired proportions (Tango 1998, Statistics in Medicine 17:891): the set of changes that the score test, whose
statistic at zero change is McNemar's, does not reject at the 5% level. Unlike the Wald interval it keeps a
width with no flipped image at all (about ±3.84/n) and stays inside [-1, 1].
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def tango_statistic(gained: int, lost: int, n: int, delta: float) -> float:
    """The score statistic of the hypothesis "the top-1 change is ``delta``" (at 0: McNemar's)."""
    b, c = gained, lost  # b: wrong -> right; c: right -> wrong; change = (b - c) / n
    a = 2.0 * n
    bb = -b - c + (2.0 * n - b + c) * delta
    cc = -c * delta * (1.0 - delta)
    # the constrained maximum-likelihood probability of a lost image under the hypothesis
    p_lost = (math.sqrt(max(bb * bb - 4.0 * a * cc, 0.0)) - bb) / (2.0 * a)
    var = n * (2.0 * p_lost + delta * (1.0 - delta))
    diff = b - c - n * delta
    if var <= 0.0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(var)


def paired_change_ci(gained: int, lost: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% interval (``z``: its quantile) of the accuracy change ``(gained - lost) / n``."""
    if n <= 0:
        raise ValueError("no images")
    if gained < 0 or lost < 0 or gained + lost > n:
        raise ValueError("gained and lost must be counts of at most n images together")
    point = (gained - lost) / n

    def bound(lo: float, hi: float, outside_low: bool) -> float:
        # bisection on the monotone statistic: the edge where |T| crosses z
        for _ in range(200):
            mid = (lo + hi) / 2.0
            t = tango_statistic(gained, lost, n, mid)
            if (t > z) if outside_low else (t < -z):
                lo, hi = (mid, hi) if outside_low else (lo, mid)
            else:
                lo, hi = (lo, mid) if outside_low else (mid, hi)
            if hi - lo < 1e-12:
                break
        return (lo + hi) / 2.0

    lower = bound(-1.0, point, outside_low=True)
    upper = bound(point, 1.0, outside_low=False)
    return max(-1.0, lower), min(1.0, upper)


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: is a change this large likely when nothing changed?"""
    m = gained + lost
    if m == 0:
        return 1.0
    k = min(gained, lost)
    # P(X <= k) for X ~ Binomial(m, 1/2), doubled; in logs, so that tens of thousands of flips stay cheap
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2.0) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of one proportion (an agreement, where nothing is paired)."""
    if n <= 0:
        raise ValueError("no images")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
