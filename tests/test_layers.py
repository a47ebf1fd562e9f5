"""RoPE and RMSNorm against NumPy written another way. Every variant of the
model shares them, so the causality, remat and mesh tests cannot see them
wrong. (Mutations run once, each failing a test here: RoPE with its halves
swapped, or frequencies theta^(-j/H) instead of theta^(-2j/H); RMSNorm
without its scale, or with epsilon 1e-2.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import layers

THETA = 10_000.0


def _rope_reference(x, positions, theta):
  """Rotate-half RoPE as complex numbers: the pair (x[j], x[j + H/2]) is
  x[j] + i x[j + H/2], turned by positions * theta ** (-2j / H)."""
  h = x.shape[-1]
  z = x[..., :h // 2] + 1j * x[..., h // 2:]                         # [B, T, N, H/2]
  freq = theta ** (-2.0 * np.arange(h // 2) / h)
  turned = z * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([turned.real, turned.imag], axis=-1)


_rope = jax.jit(layers.rope, static_argnums=2)


def test_rope_equals_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
  positions = np.stack([np.arange(7), np.arange(7) + 100])
  got = np.asarray(_rope(jnp.asarray(x), jnp.asarray(positions), THETA))
  np.testing.assert_allclose(got, _rope_reference(x, positions, THETA), atol=2e-5)
  np.testing.assert_allclose(got[:, :1][0], x[0, :1], atol=1e-6)   # position 0: unturned


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(i, j):
    qi = _rope(q, jnp.array([[i]]), THETA)
    kj = _rope(k, jnp.array([[j]]), THETA)
    return float(jnp.sum(qi * kj))

  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
  assert score(40, 0) == pytest.approx(score(47, 7), abs=1e-4)
  assert abs(score(5, 2) - score(5, 3)) > 1e-2        # and on nothing less


def test_rms_norm_equals_numpy():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 5, 12)).astype(np.float32) * 3
  norm = layers.RMSNorm(12)
  scale = rng.standard_normal(12).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
  y16 = norm(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16                      # computed in f32, cast back
  np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=2e-2, atol=2e-2)
