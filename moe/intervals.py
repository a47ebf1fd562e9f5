"""95% intervals for comparing runs (DESIGN.md §7).

  mean_interval(values) -> Interval            # over seeds: Student's t
  paired_bootstrap(a, b, tokens) -> Interval   # one seed: over documents
  verdict(interval) -> 'ahead' | 'behind' | 'within noise' | 'not ranked'

A ranking of two arms needs several seeds: arms share seed i (init, data
order, router noise), so the per-seed differences are paired and their
t-interval is the one to read. With a single seed the only noise left to
measure is the evaluation set's: `paired_bootstrap` resamples validation
documents (with replacement) and recomputes the difference of the two
token-weighted losses; it says nothing about training noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000


class Interval(NamedTuple):
  mean: float
  low: float
  high: float
  n: int          # seeds, or documents for a bootstrap
  kind: str       # 'seeds', 'bootstrap over documents' or 'single value'


def mean_interval(values) -> Interval:
  """The mean of `values` (one per seed) and its 95% Student-t interval."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError('mean_interval needs at least one value.')
  mean = float(v.mean())
  if v.size == 1:
    return Interval(mean, math.nan, math.nan, 1, 'single value')
  half = stats.t.ppf(0.5 + LEVEL / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  return Interval(mean, mean - half, mean + half, int(v.size), 'seeds')


def paired_bootstrap(loss_a, loss_b, tokens, *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> Interval:
  """Interval of loss(a) - loss(b) over resampled documents.

  loss_a, loss_b: each document's summed target loss under run a and run b
  (the same evaluation set); tokens: each document's target count. The
  statistic is the token-weighted loss difference, as the eval loss is."""
  a, b, t = (np.asarray(x, np.float64) for x in (loss_a, loss_b, tokens))
  if not a.shape == b.shape == t.shape or a.ndim != 1:
    raise ValueError(f'per-document arrays differ in shape: {a.shape}, '
                     f'{b.shape}, {t.shape} (the runs evaluated different sets?)')
  keep = t > 0
  a, b, t = a[keep], b[keep], t[keep]
  diff = (a.sum() - b.sum()) / t.sum()
  pick = np.random.default_rng(seed).integers(0, len(t), size=(samples, len(t)))
  boot = (a[pick].sum(1) - b[pick].sum(1)) / t[pick].sum(1)
  low, high = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
  return Interval(float(diff), float(low), float(high), int(len(t)),
                  'bootstrap over documents')


def verdict(difference: Interval) -> str:
  """For a loss difference a - b: 'ahead' (a lower beyond noise), 'behind',
  'within noise' (the interval holds 0) or 'not ranked' (no interval)."""
  if difference.kind == 'single value' or not difference.low <= difference.high:
    return 'not ranked'
  if difference.high < 0:
    return 'ahead'
  if difference.low > 0:
    return 'behind'
  return 'within noise'
