"""Standard errors for every score: the bootstrap over items (numpy does the resampling).

A score over N items is a statistic of N per-item values (1/0 for accuracy, a per-item ROUGE-L, ...).
Its standard error is the standard deviation of that statistic over `resamples` resamples of the
items with replacement, seeded so that a rerun reports the same figure. For a mean this approaches the
textbook sqrt(p(1-p)/N); for corpus-level scores such as BLEU it is the only honest figure.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000


def bootstrap_stderr(values: Sequence, statistic: Callable[[Sequence], float] | None = None,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> float | None:
    """Bootstrap standard error of `statistic` (default: the mean) over `values`; None below 2 items."""
    n = len(values)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    if statistic is None:
        data = np.asarray(values, dtype=np.float64)
        estimates = data[draws].mean(axis=1)
    else:
        estimates = np.array([statistic([values[i] for i in row]) for row in draws], dtype=np.float64)
    return float(estimates.std(ddof=1))


def bootstrap_stderr_of_sums(stats: np.ndarray, score: Callable[[np.ndarray], float],
                             resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> float | None:
    """Bootstrap standard error of a corpus score computed from additive per-item statistics.

    `stats` is [items, k] (BLEU's n-gram matches and totals, an entity F1's true positives and counts);
    each resample sums its rows and `score` turns the sums into the figure. The same resamples as
    `bootstrap_stderr`, without recomputing anything per item.
    """
    n = len(stats)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    sums = np.asarray(stats, dtype=np.float64)[draws].sum(axis=1)
    return float(np.array([score(row) for row in sums], dtype=np.float64).std(ddof=1))
