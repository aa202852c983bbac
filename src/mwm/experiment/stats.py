"""The experiment's statistics: mean ± std over seeds, paired differences and their 95%
confidence intervals, and the sample sizes a target half-width needs.

Every spread here is the sample standard deviation (``ddof = 1``, :func:`statistics.stdev`).
The 95% confidence interval of a mean of ``n`` paired differences is Student's t:
``mean ± t(0.975, n - 1) * sd / sqrt(n)``; with fewer than two values it is undefined
(``None``, never 0).
"""

from __future__ import annotations

import math
import statistics

LEVEL = 0.95


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the finite values (NaN, NaN without any; std 0 with one)."""
    values = [v for v in values if finite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_summary(diffs: list) -> dict:
    """Of per-seed paired differences: their mean (``delta``) ± sd (``delta_std``), the 95%
    CI half-width of the mean (``delta_ci``) and how many there are (None where undefined)."""
    delta, sd = mean_std(diffs)
    return {"delta": delta if finite(delta) else None, "delta_std": sd if finite(sd) else None,
            "delta_ci": ci_half_width(diffs), "n_paired": len(diffs)}


def t_quantile(n: int) -> float:
    """t(0.975, n - 1): the two-sided 95% quantile of Student's t for a mean of n values."""
    from scipy.stats import t

    return float(t.ppf(0.5 + LEVEL / 2, n - 1))


def half_width(sd: float, n: int) -> float | None:
    """The 95% CI half-width ``t(0.975, n - 1) * sd / sqrt(n)`` (None for n < 2)."""
    if n < 2 or not finite(sd):
        return None
    return t_quantile(n) * sd / math.sqrt(n)


def ci_half_width(values: list) -> float | None:
    """The 95% CI half-width of the mean of the finite ``values`` (sd with ddof 1)."""
    values = [v for v in values if finite(v)]
    if len(values) < 2:
        return None
    return half_width(statistics.stdev(values), len(values))


def n_for_half_width(sd: float, target: float, minimum: int = 2) -> int | None:
    """The smallest n >= ``minimum`` with ``t(0.975, n - 1) * sd / sqrt(n) <= target``
    (None when ``sd`` is unknown). The normal quantile gives a lower bound to start from,
    since t's is larger."""
    if not finite(sd) or not target > 0:
        return None
    if sd == 0:
        return minimum
    n = max(minimum, math.ceil((1.959963984540054 * sd / target) ** 2))
    while half_width(sd, n) > target:
        n += 1
    return n
