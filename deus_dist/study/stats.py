"""Honest error bars: intervals over seeds, paired bootstrap differences over windows and seeds.

Perplexities are compared in nats (mean NLL per token): an arm's final loss on a set is its mean
over the set's windows, one number per seed; the 95% interval of its mean over seeds is Student's
t. The difference to the baseline is paired: the same windows, the same seeds (seed s of every
arm saw the same data order), d[s, w] = loss_arm[s, w] - loss_baseline[s, w]; its 95% interval
comes from a bootstrap that resamples seeds and windows. An interval that contains zero is "no
difference", never a win.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 4000


def t_interval(values, level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of the mean of ``values``; no interval from a single value."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def paired_bootstrap(
    diff, iters: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``diff`` [seeds, windows], resampling seeds and windows
    with replacement (a two-level bootstrap: both the training seed and the evaluation windows are
    samples)."""
    d = np.asarray(diff, dtype=float)
    rng = np.random.default_rng(seed)
    seeds, windows = d.shape
    means = np.empty(iters)
    for i in range(iters):
        rows = d[rng.integers(0, seeds, seeds)]
        means[i] = rows[:, rng.integers(0, windows, windows)].mean()
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def verdict(low: float | None, high: float | None) -> str:
    """Lower loss is better; an interval across zero is no difference."""
    if low is None or high is None:
        return "n/a"
    if low <= 0.0 <= high:
        return "no difference"
    return "better" if high < 0 else "worse"
