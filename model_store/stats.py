"""Statistics for evaluation reports: spread over build seeds, paired bootstrap against a peer.

Pure functions over numbers (no bundles, no files), so they can be tested on synthetic scores.

Two different uncertainties are reported, and they answer different questions:

* mean ± std over seeds: how much a figure moves when only the build's random seed changes
  (training noise). The std is the sample std (n - 1): with three seeds it estimates the
  spread of one more build, not the spread of these three. With one seed there is no spread
  to estimate, so it is `None` (shown "n/a"), never 0.
* the paired bootstrap: how much a difference between two systems moves when the *users*
  are resampled. Pairing (the same users in every resample, the difference taken per user)
  cancels how hard each user is, which the two systems share, so the interval is much
  tighter than comparing two unpaired intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Table = Mapping[str, Mapping[str, float]]
"""row → metric → value, the shape of one evaluation's summary."""


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); std is `None` for a single value (no spread known)."""
    if not values:
        raise ValueError("mean_std of no values")
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return float(array.mean()), std


def aggregate(
    per_seed: Sequence[Table],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float | None]]]:
    """(mean, std) tables over seeds, row by row and metric by metric.

    Every seed must report the same rows and metrics: a figure missing from one seed would
    silently average over fewer seeds."""
    if not per_seed:
        raise ValueError("aggregate of no seeds")
    shapes = {frozenset((row, frozenset(fig)) for row, fig in t.items()) for t in per_seed}
    if len(shapes) != 1:
        raise ValueError("seeds report different rows or metrics")
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float | None]] = {}
    for row, figures in per_seed[0].items():
        mean[row], std[row] = {}, {}
        for metric in figures:
            values = [table[row][metric] for table in per_seed]
            mean[row][metric], std[row][metric] = mean_std(values)
    return mean, std


@dataclass(frozen=True)
class Interval:
    """A paired difference `ours - peer` over `n` users and its bootstrap interval."""

    mean: float  # observed mean difference over the paired users
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0: the difference is
        distinguishable from none at this level (for this set of users)."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "mean_diff": self.mean,
            "low": self.low,
            "high": self.high,
            "users": self.n,
            "level": self.level,
            "excludes_zero": self.excludes_zero,
        }


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def paired_bootstrap(
    ours: Mapping[str, np.ndarray],
    peer: Mapping[str, np.ndarray],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = 1000,
) -> dict[str, Interval]:
    """Percentile bootstrap of mean(ours - peer) per metric, users resampled with replacement.

    `ours[m][i]` and `peer[m][i]` must be the same user i. All metrics share the same
    resamples (one draw of users per resample), so their intervals describe the same
    hypothetical user populations. The RNG seed is fixed so a report is reproducible;
    `chunk` bounds memory (chunk x users indices at a time)."""
    metrics = list(ours)
    diffs = np.stack(
        [np.asarray(ours[m], np.float64) - np.asarray(peer[m], np.float64) for m in metrics],
        axis=1,
    )
    n = len(diffs)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one paired user")
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, len(metrics)))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0)
    observed = diffs.mean(axis=0)
    return {
        m: Interval(float(observed[j]), float(low[j]), float(high[j]), n, level)
        for j, m in enumerate(metrics)
    }


def format_spread(mean: float, std: float | None, digits: int = 4) -> str:
    """`0.1234 ± 0.0056`, or just `0.1234` when there is no spread (one seed)."""
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
