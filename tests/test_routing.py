"""Routers: capacity invariants and priority, aux/z losses by hand, router
statistics, float32 router math, training noise, the balance-bias rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe.config import MoeConfig

import oracle


def _cfg(e, k, **kw):
  kw.setdefault('min_capacity', 1)
  return MoeConfig(num_experts=e, top_k=k, expert_dim=8, **kw)


def _logits(seed, *shape, scale=2.0):
  return jnp.asarray(scale * np.random.RandomState(seed).standard_normal(shape),
                     jnp.float32)


@functools.partial(jax.jit, static_argnames=('cfg', 'capacity'))
def _tokens_choose(logits, bias=None, *, cfg, capacity):
  return routing.tokens_choose(logits, cfg, capacity, bias)


# Jitted entry points: one compilation each instead of many eager op compilations.
_experts_choose = jax.jit(routing.experts_choose, static_argnums=(1, 2))
_route = jax.jit(routing.route, static_argnums=(1, 2))
_router_logits = jax.jit(routing.router_logits, static_argnames=('cfg', 'train'))
_aux_loss = jax.jit(routing.aux_loss, static_argnums=(2, 3))


def _softmax(logits):
  l = np.asarray(logits, np.float64)
  p = np.exp(l - l.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


# --- Capacity invariants and priority -----------------------------------------

@pytest.mark.parametrize('priority', ['choice', 'position'])
@pytest.mark.parametrize('e,k,c', [(5, 1, 6), (5, 2, 9), (4, 3, 7)])
def test_tokens_choose_capacity_invariants_and_priority(e, k, c, priority):
  g, s = 3, 37
  cfg = _cfg(e, k, priority=priority)
  logits = _logits(e * k, g, s, e)
  r, stats = _tokens_choose(logits, cfg=cfg, capacity=c)
  ei, slot, kept, gate = map(np.asarray, r[:4])
  probs = _softmax(logits)
  assert r.capacity == c
  # Top-k of the probabilities, best first, distinct experts.
  np.testing.assert_array_equal(ei, np.argsort(-probs, -1, kind='stable')[..., :k])
  assert (~kept).any() and kept.any()
  for gi in range(g):
    for x in range(e):
      mine = ei[gi] == x
      n_kept = int((mine & kept[gi]).sum())
      assert n_kept <= c                                  # never above capacity
      if (mine & ~kept[gi]).any():
        assert n_kept == c                                # dropped only when full
      # Kept slots are 0..n-1, each once.
      np.testing.assert_array_equal(np.sort(slot[gi][mine & kept[gi]]), np.arange(n_kept))
      # Priority: rank by (choice, position) or (position, choice); kept
      # exactly the first C of them.
      ss, kk = np.nonzero(mine)
      order = np.lexsort((ss, kk) if priority == 'choice' else (kk, ss))
      np.testing.assert_array_equal(slot[gi][ss[order], kk[order]], np.arange(len(ss)))
  # Same as the oracle's assignment loop.
  asg = oracle.assign_tokens_choose(probs, k, c, priority=priority)
  np.testing.assert_array_equal(kept, asg.kept)
  np.testing.assert_array_equal(np.where(kept, slot, -1), asg.slot)
  # Gates: the chosen probs where kept, exactly 0 where dropped.
  np.testing.assert_allclose(gate, np.where(kept, np.take_along_axis(probs, ei, -1), 0.0),
                             rtol=1e-6)
  np.testing.assert_allclose(stats.dropped_fraction, 1.0 - kept.mean(), rtol=1e-6)
  load = np.bincount(ei.ravel(), minlength=e) / ei.size   # before capacity drops
  np.testing.assert_allclose(stats.expert_load, load, rtol=1e-6)


def test_first_choices_beat_earlier_second_choices():
  """Hand example, E=2, k=2, C=2: token 0's second choice (expert 1) loses to
  token 2's FIRST choice of expert 1 although token 0 comes first."""
  logits = jnp.asarray([[[2.0, 1.0],     # t0: e0, then e1
                         [0.0, 3.0],     # t1: e1, then e0
                         [0.5, 2.5]]])   # t2: e1, then e0
  r, stats = _tokens_choose(logits, cfg=_cfg(2, 2), capacity=2)
  np.testing.assert_array_equal(r.expert_index[0], [[0, 1], [1, 0], [1, 0]])
  # e1 ranks t1 (1st), t2 (1st), t0 (2nd); e0 ranks t0 (1st), t1 (2nd), t2 (2nd).
  np.testing.assert_array_equal(r.slot[0], [[0, 2], [0, 1], [1, 2]])
  np.testing.assert_array_equal(r.kept[0], [[True, False], [True, True], [True, False]])
  np.testing.assert_allclose(stats.dropped_fraction, 2 / 6, rtol=1e-6)
  p = _softmax(logits[0])
  np.testing.assert_allclose(r.gate[0], [[p[0, 0], 0], [p[1, 1], p[1, 0]], [p[2, 1], 0]],
                             rtol=1e-6)


def test_renormalized_gates_sum_to_one_over_kept_pairs():
  cfg = _cfg(5, 2, renormalize_gates=True)
  logits = _logits(1, 2, 17, 5)
  r, _ = _tokens_choose(logits, cfg=cfg, capacity=100)
  assert bool(np.all(r.kept))
  np.testing.assert_allclose(np.sum(r.gate, -1), 1.0, rtol=1e-6)
  p = np.sort(_softmax(logits), -1)[..., ::-1][..., :2]
  np.testing.assert_allclose(r.gate, p / p.sum(-1, keepdims=True), rtol=1e-6)


def test_experts_choose_takes_top_c_tokens_per_expert():
  g, s, e, c = 2, 11, 3, 4
  logits = _logits(2, g, s, e)
  r, stats = _experts_choose(logits, _cfg(e, 1, router='experts_choose'), c)
  probs = _softmax(logits)
  kept = np.asarray(r.kept)
  assert r.expert_index.shape == (g, s, e)                # K = E: choice e is expert e
  np.testing.assert_array_equal(r.expert_index, np.broadcast_to(np.arange(e), (g, s, e)))
  np.testing.assert_array_equal(kept.sum(1), c)           # exactly C tokens per expert
  for gi in range(g):
    for x in range(e):
      top = np.argsort(-probs[gi, :, x], kind='stable')[:c]
      np.testing.assert_array_equal(np.nonzero(kept[gi, :, x])[0], np.sort(top))
      np.testing.assert_array_equal(np.asarray(r.slot)[gi, top, x], np.arange(c))
  np.testing.assert_allclose(r.gate, np.where(kept, probs, 0.0), rtol=1e-6)
  np.testing.assert_allclose(stats.dropped_fraction, 1 - kept.any(-1).mean(), rtol=1e-6)
  # Capacity above the group size is clipped to it: every expert takes all.
  r2, _ = _experts_choose(logits, _cfg(e, 1, router='experts_choose'), 50)
  assert r2.capacity == s and bool(np.all(r2.kept))


def test_route_dispatches_on_router_name():
  logits = _logits(3, 1, 6, 3)
  r_tc, _ = _route(logits, _cfg(3, 1), 2)
  r_ec, _ = _route(logits, _cfg(3, 1, router='experts_choose'), 2)
  assert r_tc.expert_index.shape == (1, 6, 1)
  assert r_ec.expert_index.shape == (1, 6, 3)


# --- Losses ---------------------------------------------------------------------

@pytest.mark.parametrize('k', [1, 2])
def test_aux_loss_is_one_at_uniform_routing(k):
  e, g, s = 4, 2, 8
  probs = jnp.full((g, s, e), 1.0 / e)
  # Each expert chosen by exactly k*s/e tokens: token t picks t, t+1 (mod e).
  idx = (np.arange(s)[:, None] + np.arange(k)[None, :]) % e
  idx = jnp.asarray(np.broadcast_to(idx, (g, s, k)))
  np.testing.assert_allclose(_aux_loss(probs, idx, e), 1.0, rtol=1e-6)


@pytest.mark.parametrize('e', [2, 5, 8])
def test_aux_loss_is_e_at_collapse(e):
  probs = jnp.zeros((3, 7, e)).at[..., 1].set(1.0)
  idx = jnp.ones((3, 7, 1), jnp.int32)
  np.testing.assert_allclose(_aux_loss(probs, idx, e), float(e), rtol=1e-6)


def test_aux_loss_hand_computation_and_from_tokens_choose():
  g, s, e, k = 3, 13, 5, 2
  logits = _logits(4, g, s, e)
  _, stats = _tokens_choose(logits, cfg=_cfg(e, k), capacity=2)   # drops don't matter
  probs = _softmax(logits)
  idx = np.argsort(-probs, -1, kind='stable')[..., :k]
  per_group = []
  for gi in range(g):
    f = [sum(x in idx[gi, t] for t in range(s)) / s for x in range(e)]
    p = [probs[gi, :, x].mean() for x in range(e)]
    per_group.append(e / k * sum(fi * pi for fi, pi in zip(f, p)))
  np.testing.assert_allclose(stats.aux_loss, np.mean(per_group), rtol=1e-5)
  assert 1.0 < float(stats.aux_loss) < e                  # non-uniform random routing


def test_aux_loss_over_the_batch_by_hand():
  g, s, e, k = 3, 13, 5, 2
  logits = _logits(6, g, s, e)
  _, stats = _tokens_choose(logits, cfg=_cfg(e, k, balance_scope='batch'), capacity=2)
  probs = _softmax(logits).reshape(g * s, e)
  idx = np.argsort(-probs, -1, kind='stable')[..., :k]
  f = [sum(x in idx[t] for t in range(g * s)) / (g * s) for x in range(e)]
  p = [probs[:, x].mean() for x in range(e)]
  np.testing.assert_allclose(stats.aux_loss, e / k * sum(fi * pi for fi, pi in zip(f, p)),
                             rtol=1e-5)


def test_batch_scope_forgives_groups_that_lean_on_experts():
  # Group 0 sends every token to expert 0, group 1 to expert 1: each group
  # has collapsed (aux = E per group), the batch is perfectly balanced (1.0).
  # (Mutation: 'batch' computed per group gives 2.0, not 1.0.)
  probs = jnp.stack([jnp.tile(jnp.array([1.0, 0.0]), (6, 1)),
                     jnp.tile(jnp.array([0.0, 1.0]), (6, 1))])      # [2, 6, 2]
  idx = jnp.argmax(probs, -1)[..., None]
  np.testing.assert_allclose(_aux_loss(probs, idx, 2, 'group'), 2.0, rtol=1e-6)
  np.testing.assert_allclose(_aux_loss(probs, idx, 2, 'batch'), 1.0, rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_batch_scope_equals_group_scope_on_one_group(k):
  logits = _logits(7, 1, 32, 6)
  _, group = _tokens_choose(logits, cfg=_cfg(6, k), capacity=8)
  _, batch = _tokens_choose(logits, cfg=_cfg(6, k, balance_scope='batch'), capacity=8)
  np.testing.assert_allclose(batch.aux_loss, group.aux_loss, rtol=1e-6)


def test_z_loss_and_entropy_by_hand():
  logits = _logits(5, 2, 9, 4, scale=3.0)
  _, stats = _tokens_choose(logits, cfg=_cfg(4, 1), capacity=9)
  l = np.asarray(logits, np.float64)
  lse = np.log(np.exp(l).sum(-1))
  np.testing.assert_allclose(stats.z_loss, np.mean(lse ** 2), rtol=1e-5)
  p = np.exp(l - lse[..., None])
  np.testing.assert_allclose(stats.router_entropy, np.mean(-(p * np.log(p)).sum(-1)),
                             rtol=1e-4)
  _, stats_ec = _experts_choose(logits, _cfg(4, 1, router='experts_choose'), 3)
  np.testing.assert_allclose(stats_ec.z_loss, np.mean(lse ** 2), rtol=1e-5)


# --- Router logits: float32, noise ------------------------------------------------

def test_router_logits_are_float32_for_bfloat16_inputs():
  x = jnp.asarray(np.random.RandomState(6).standard_normal((2, 5, 7)), jnp.bfloat16)
  w = jnp.asarray(np.random.RandomState(7).standard_normal((7, 3)), jnp.float32)
  logits = _router_logits(x, w, cfg=_cfg(3, 1), train=False, rng=None)
  assert logits.dtype == jnp.float32
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  r, stats = _tokens_choose(logits, cfg=_cfg(3, 1), capacity=4)
  assert r.gate.dtype == jnp.float32 and stats.aux_loss.dtype == jnp.float32


def _noisy_logits(cfg, train, rng, d=6):
  x = jnp.asarray(np.random.RandomState(8).standard_normal((2, 50, d)) + 2.0, jnp.float32)
  return x, _router_logits(x, jnp.eye(d), cfg=cfg, train=train, rng=rng)


def test_jitter_multiplies_inputs_within_bounds():
  eps = 0.1
  x, logits = _noisy_logits(_cfg(6, 1, jitter_eps=eps), True, jax.random.key(0))
  ratio = np.asarray(logits / x)                           # router = identity
  assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
  assert ratio.std() > eps / 4                             # actually noisy, ~U(0.9, 1.1)


def test_logit_noise_is_gaussian_with_configured_std():
  std = 0.5
  x, logits = _noisy_logits(_cfg(6, 1, logit_noise_std=std), True, jax.random.key(1))
  noise = np.asarray(logits - x)
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - std) < 0.06


def test_noise_draws_do_not_interact_and_are_reproducible():
  key = jax.random.key(2)
  both = _cfg(6, 1, jitter_eps=0.1, logit_noise_std=0.5)
  _, l_both = _noisy_logits(both, True, key)
  _, l_jit = _noisy_logits(_cfg(6, 1, jitter_eps=0.1), True, key)
  x, l_noise = _noisy_logits(_cfg(6, 1, logit_noise_std=0.5), True, key)
  # Turning one kind of noise on does not change the other's draws.
  np.testing.assert_allclose(l_both - l_jit, l_noise - x, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(_noisy_logits(both, True, key)[1], l_both)
  assert not np.allclose(_noisy_logits(both, True, jax.random.key(3))[1], l_both)
  # Eval: no noise whatever the key (or none).
  for rng in (None, key, jax.random.key(3)):
    np.testing.assert_array_equal(_noisy_logits(both, False, rng)[1], x)
  with pytest.raises(ValueError, match='rng'):
    _noisy_logits(both, True, None)
  # Without noise configured, training needs no rng.
  np.testing.assert_array_equal(_noisy_logits(_cfg(6, 1), True, None)[1], x)


# --- Balance bias --------------------------------------------------------------------

def test_balance_bias_update_rule():
  bias = jnp.asarray([0.0, 0.1, -0.2, 0.05])
  load = jnp.asarray([0.5, 0.25, 0.125, 0.125])          # mean 0.25
  new = jax.jit(routing.balance_bias_update, static_argnums=2)(bias, load, 0.01)
  np.testing.assert_allclose(new, [-0.01, 0.1, -0.19, 0.06], rtol=1e-6)


def test_balance_bias_steers_selection_not_gates():
  logits = _logits(9, 1, 20, 4)
  bias = jnp.asarray([0.0, 0.0, 5.0, 0.0])                 # > any prob gap
  r, stats = _tokens_choose(logits, bias, cfg=_cfg(4, 1), capacity=20)
  np.testing.assert_array_equal(r.expert_index, 2)
  np.testing.assert_allclose(r.gate[..., 0], _softmax(logits)[..., 2], rtol=1e-6)
  np.testing.assert_allclose(stats.expert_load, [0, 0, 1, 0])
