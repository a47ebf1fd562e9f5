"""moe.intervals: the t-interval over seeds, the paired bootstrap over
documents, and the verdict the report's sentences use."""

import math

import numpy as np
import pytest

from moe import intervals


def test_mean_interval_is_students_t():
  iv = intervals.mean_interval([1.0, 2.0, 3.0])
  # mean 2, sample sd 1, t(0.975, df=2) = 4.302653: half-width 4.302653/sqrt(3).
  half = 4.302653 / math.sqrt(3)
  assert (iv.mean, iv.n, iv.kind) == (2.0, 3, 'seeds')
  assert iv.low == pytest.approx(2 - half, rel=1e-6)
  assert iv.high == pytest.approx(2 + half, rel=1e-6)
  one = intervals.mean_interval([0.25])
  assert one.kind == 'single value' and one.mean == 0.25 and math.isnan(one.low)
  assert intervals.verdict(one) == 'not ranked'
  with pytest.raises(ValueError, match='at least one value'):
    intervals.mean_interval([])


def test_paired_bootstrap_token_weighted():
  rng = np.random.default_rng(1)
  tokens = rng.integers(50, 500, size=40).astype(float)
  loss_b = tokens * rng.uniform(1.0, 2.0, size=40)
  # a is b plus exactly 0.1 nats on every token: every resample says 0.1.
  iv = intervals.paired_bootstrap(loss_b + 0.1 * tokens, loss_b, tokens)
  assert iv.mean == pytest.approx(0.1)
  assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)
  assert iv.n == 40 and intervals.verdict(iv) == 'behind'
  # Noisy per-document differences around -0.05: the interval holds -0.05
  # and is roughly the normal one of a token-weighted mean.
  noisy = loss_b + tokens * rng.normal(-0.05, 0.2, size=40)
  iv = intervals.paired_bootstrap(noisy, loss_b, tokens)
  d = (noisy - loss_b) / tokens
  w = tokens / tokens.sum()
  se = math.sqrt((w ** 2 * (d - iv.mean) ** 2).sum())
  assert iv.mean == pytest.approx((noisy - loss_b).sum() / tokens.sum())
  assert iv.high - iv.low == pytest.approx(2 * 1.96 * se, rel=0.25)
  # Documents without targets are left out; shapes must agree.
  padded = intervals.paired_bootstrap(np.append(noisy, 0), np.append(loss_b, 0),
                                      np.append(tokens, 0))
  assert padded.n == 40
  with pytest.raises(ValueError, match='differ in shape'):
    intervals.paired_bootstrap(noisy[:3], loss_b, tokens)


@pytest.mark.parametrize('low, high, expected', [
    (-0.3, -0.1, 'ahead'), (0.1, 0.3, 'behind'), (-0.1, 0.2, 'within noise')])
def test_verdict(low, high, expected):
  iv = intervals.Interval((low + high) / 2, low, high, 3, 'seeds')
  assert intervals.verdict(iv) == expected
