"""MoeFeedForward: equals the per-expert loop oracle through the grouping,
routing stays causal (top-1, with drops), one expert equals a dense SwiGLU,
noise, router gradients, capacities, shared experts, the balance bias, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config import ConfigError, ModelConfig, MoeConfig
from moe.layers import swiglu
from moe.moe_layer import BalanceBias, MoeFeedForward, from_groups, to_groups

import oracle

TOL = dict(rtol=2e-5, atol=2e-5)


def _layer(d=11, dtype='float32', seed=0, **moe_kw):
  """A layer with numpy-drawn parameters (std 1/sqrt(fan-in)) and a zero
  balance bias: built abstractly, so no eager jax.random compilations."""
  moe_kw.setdefault('min_capacity', 1)
  moe_kw.setdefault('expert_dim', 7)
  cfg = ModelConfig(256, d_model=d, dtype=dtype, moe=MoeConfig(**moe_kw))
  abstract = nnx.eval_shape(lambda: MoeFeedForward(cfg, jax.random.key(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rs = np.random.RandomState(seed)
  params = jax.tree.map(lambda a: jnp.asarray(
      rs.standard_normal(a.shape) / np.sqrt(a.shape[-2]), a.dtype), params)
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
  return nnx.merge(graphdef, params, rest)


def _normal(seed, *shape, dtype=jnp.float32):
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), dtype)


def _apply(layer, x, train=False, rng=None, capacity_factor=None):
  """Jitted forward of a layer (one compilation per config and shape)."""
  graphdef, state = nnx.split(layer)
  return _jit_apply(graphdef, state, x, train, rng, capacity_factor)


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _jit_apply(graphdef, state, x, train, rng, capacity_factor):
  return nnx.merge(graphdef, state)(x, train=train, rng=rng,
                                    capacity_factor=capacity_factor)


# --- Grouping -------------------------------------------------------------------

def test_groups_are_time_major_whole_sequences_and_invert():
  b, t, d, spg = 6, 5, 3, 3
  x = _normal(0, b, t, d)
  xg = to_groups(x, spg)
  assert xg.shape == (b // spg, t * spg, d)
  for g in range(b // spg):
    for pos in range(t):
      for j in range(spg):    # position pos of every sequence before pos + 1
        np.testing.assert_array_equal(xg[g, pos * spg + j], x[g * spg + j, pos])
  np.testing.assert_array_equal(from_groups(xg, spg, t), x)


def test_seqs_per_group_and_indivisible_batch():
  m = _layer(num_experts=4, group_size=20).moe_cfg
  assert m.seqs_per_group(8, 5) == 4
  assert m.seqs_per_group(2, 5) == 2                 # at most the batch
  assert m.seqs_per_group(8, 40) == 1                # at least one sequence
  with pytest.raises(ConfigError, match='multiple of 4'):
    m.seqs_per_group(6, 5)


# --- The layer against the oracle ----------------------------------------------------

@pytest.mark.parametrize('k', [1, 2])
def test_layer_equals_oracle_forward_and_grads(k):
  b, t, e = 4, 5, 4                                   # 2 groups of 2 sequences
  x = _normal(1, b, t, 11)
  cot = _normal(2, b, t, 11)
  layers = {p: _layer(num_experts=e, top_k=k, group_size=10, dispatch=p,
                      train_capacity_factor=0.75) for p in ('einsum', 'gather')}
  lay = layers['einsum']
  c = lay.moe_cfg.capacity(10, train=True)
  w = [lay.w_router[...], lay.w_gate[...], lay.w_up[...], lay.w_down[...]]
  asg = oracle.assign_tokens_choose(oracle.probs_of(to_groups(x, 2), w[0]), k, c)
  assert asg.num_dropped > 0

  def ref(x, *w):
    return from_groups(oracle.oracle_moe(to_groups(x, 2), *w, asg), 2, t)
  y_ref, vjp = jax.vjp(ref, x, *w)
  g_ref = vjp(cot)

  for path, layer in layers.items():
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(x, params, rest, graphdef=graphdef):
      return nnx.merge(graphdef, params, rest)(x, train=True)[0]
    y, vjp = jax.vjp(lambda x, p: f(x, p, rest), x, params)
    gx, gp = vjp(cot)
    np.testing.assert_allclose(y, y_ref, err_msg=path, **TOL)
    np.testing.assert_allclose(gx, g_ref[0], err_msg=path, **TOL)
    for name, gr in zip(('w_router', 'w_gate', 'w_up', 'w_down'), g_ref[1:]):
      np.testing.assert_allclose(gp[name][...], gr, err_msg=f'{path} {name}', **TOL)


# --- Causality ----------------------------------------------------------------------

def _causal_setup(router, path, k=1, priority='choice'):
  layer = _layer(num_experts=4, top_k=k, group_size=32, router=router,
                 dispatch=path, train_capacity_factor=0.5, seed=3,
                 priority=priority)
  b, t, split = 4, 8, 3                        # one group of 4 sequences, time-major
  x = _normal(4, b, t, 11)
  x2 = x.at[:, split + 1:].set(_normal(5, b, t - split - 1, 11))
  return layer, x, x2, split


@pytest.mark.parametrize('path', ['einsum', 'gather'])
def test_top1_routing_is_causal_with_drops(path):
  layer, x, x2, t = _causal_setup('tokens_choose', path)
  y, stats = _apply(layer, x, train=True)
  y2, stats2 = _apply(layer, x2, train=True)
  assert stats.dropped_fraction > 0.3 and stats2.dropped_fraction > 0.3
  # The perturbation really re-routed later tokens...
  idx = lambda x: np.argmax(to_groups(x, 4) @ layer.w_router[...], -1)
  assert (idx(x) != idx(x2)).any()
  assert np.abs(np.asarray(y2 - y)[:, t + 1:]).max() > 1e-2
  # ...and left every output at positions <= t unchanged.
  np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize('path', ['einsum', 'gather'])
def test_top2_position_priority_is_causal_with_drops(path):
  layer, x, x2, t = _causal_setup('tokens_choose', path, k=2, priority='position')
  y, stats = _apply(layer, x, train=True)
  y2, _ = _apply(layer, x2, train=True)
  assert stats.dropped_fraction > 0.3
  assert np.abs(np.asarray(y2 - y)[:, t + 1:]).max() > 1e-2
  np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)


def test_position_priority_ranks_by_position_then_choice():
  """E=2, k=2, C=1: under 'position' the earlier token keeps both slots."""
  layer = _layer(d=2, num_experts=2, top_k=2, group_size=2,
                 train_capacity_factor=0.5, priority='position')
  layer.w_router[...] = jnp.eye(2)
  outs = [_apply(layer, jnp.asarray(x), train=True)[0][0, 0]
          for x in ([[[2.0, 1.0], [0.0, 3.0]]], [[[2.0, 1.0], [3.0, 0.0]]])]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_experts_choose_is_not_causal():
  """Same input and perturbation: experts-choose routing leaks the future into
  earlier positions (why it is only for non-causal use)."""
  layer, x, x2, t = _causal_setup('experts_choose', 'einsum')
  y, _ = _apply(layer, x, train=True)
  y2, _ = _apply(layer, x2, train=True)
  assert np.abs(np.asarray(y2 - y)[:, :t + 1]).max() > 1e-3


def test_top2_first_choice_priority_leaks_the_future_when_dropping():
  """Documents a limit of the priority rule (all first choices before any
  second choice): with drops, a LATER token's first choice can take the slot
  of an earlier token's second choice, so top-2 with drops is not causal.
  Two tokens, E=2, k=2, C=1, router = identity:
    t0 = [2, 1] (e0 then e1); t1 = [0, 3] (e1 first) or [3, 0] (e0 first).
  With t1 -> e1, t0's second choice (e1) is dropped; with t1 -> e0 it is kept.
  Without drops (C=2), top-2 is causal."""
  outs = {}
  for cf in (0.5, 1.0):
    layer = _layer(d=2, num_experts=2, top_k=2, group_size=2,
                   train_capacity_factor=cf)
    assert layer.moe_cfg.capacity(2, train=True) == (1 if cf == 0.5 else 2)
    layer.w_router[...] = jnp.eye(2)
    xa = jnp.asarray([[[2.0, 1.0], [0.0, 3.0]]])
    xb = jnp.asarray([[[2.0, 1.0], [3.0, 0.0]]])
    outs[cf] = [_apply(layer, x, train=True)[0][0, 0] for x in (xa, xb)]
  assert np.abs(np.asarray(outs[0.5][0] - outs[0.5][1])).max() > 1e-3
  np.testing.assert_allclose(outs[1.0][0], outs[1.0][1], rtol=1e-6, atol=1e-6)


# --- One expert is a dense SwiGLU ----------------------------------------------------

@pytest.mark.parametrize('path', ['einsum', 'gather'])
def test_single_expert_equals_dense_swiglu(path):
  layer = _layer(num_experts=1, top_k=1, group_size=10, dispatch=path,
                 train_capacity_factor=1.0, eval_capacity_factor=1.0)
  x = _normal(6, 4, 5, 11)
  dense = swiglu(x, layer.w_gate[0], layer.w_up[0], layer.w_down[0], jnp.float32)
  for train in (False, True):
    y, stats = _apply(layer, x, train=train)
    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_allclose(y, dense, **TOL)


# --- Noise ---------------------------------------------------------------------------

def test_noise_off_at_eval_reproducible_in_training():
  # Both kinds at once (each alone: test_routing.py).
  layer = _layer(num_experts=4, top_k=2, group_size=10, jitter_eps=0.2,
                 logit_noise_std=1.0)
  x = _normal(7, 4, 5, 11)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y_eval = _apply(layer, x, train=False)[0]
  for rng in (k1, k2):
    np.testing.assert_array_equal(_apply(layer, x, train=False, rng=rng)[0], y_eval)
  y1 = _apply(layer, x, train=True, rng=k1)[0]
  np.testing.assert_array_equal(_apply(layer, x, train=True, rng=k1)[0], y1)
  assert np.abs(np.asarray(_apply(layer, x, train=True, rng=k2)[0] - y1)).max() > 1e-4
  assert np.abs(np.asarray(y1 - _apply(layer, x, train=False, rng=k1)[0])).max() > 1e-4
  with pytest.raises(ValueError, match='rng'):
    _apply(layer, x, train=True)


# --- Router gradients -------------------------------------------------------------------

def test_router_gets_gradients_through_gates_and_aux_loss():
  layer = _layer(num_experts=4, top_k=2, group_size=10, train_capacity_factor=0.75)
  x = _normal(8, 4, 5, 11)
  cot = _normal(9, 4, 5, 11)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def grads(params):
    def terms(p):
      y, stats = nnx.merge(graphdef, p, rest)(x, train=True)
      return jnp.sum(y * cot), stats.aux_loss
    g_out = jax.grad(lambda p: terms(p)[0])(params)['w_router'][...]
    g_aux = jax.grad(lambda p: terms(p)[1])(params)['w_router'][...]
    g_mix = jax.grad(lambda p: terms(p)[0] + 0.3 * terms(p)[1])(params)['w_router'][...]
    return g_out, g_aux, g_mix

  g_out, g_aux, g_mix = grads(params)
  assert np.abs(np.asarray(g_out)).max() > 1e-3      # through the gates (aux coef 0)
  assert np.abs(np.asarray(g_aux)).max() > 1e-4      # through the aux loss alone
  np.testing.assert_allclose(g_mix, g_out + 0.3 * g_aux, rtol=1e-5, atol=1e-7)


# --- Capacity: train vs eval -----------------------------------------------------------------

def test_train_and_eval_capacity_factors():
  """Capacity read from what the layer keeps: every token of a group of 20
  is sent to expert 0 (positive inputs, a router that scores only expert 0),
  so expert 0 keeps exactly C tokens and the dropped fraction is 1 - C/20.
  (Mutation: the eval factor used in training, or C one slot off, changes
  the fraction by >= 0.05.)"""
  layer = _layer(num_experts=4, top_k=1, group_size=20,
                 train_capacity_factor=0.5, eval_capacity_factor=3.0)
  # With the drawn router, the dropped fraction at train capacity C=3
  # matches the oracle's count.
  x = _normal(10, 4, 5, 11)
  _, s_train = _apply(layer, x, train=True)
  asg = oracle.assign_tokens_choose(
      oracle.probs_of(to_groups(x, 4), layer.w_router[...]), 1, 3)
  np.testing.assert_allclose(s_train.dropped_fraction, 1 - asg.kept.mean(), rtol=1e-6)

  router = np.zeros((11, 4), np.float32)
  router[:, 0] = 1.0
  layer.w_router[...] = jnp.asarray(router)
  x = jnp.abs(x)                                     # 20 tokens: one group

  def dropped(**kw):
    _, stats = _apply(layer, x, **kw)
    np.testing.assert_array_equal(np.asarray(stats.expert_load), [1, 0, 0, 0])
    return float(stats.dropped_fraction)
  assert dropped(train=True) == pytest.approx(1 - 3 / 20)     # C = ceil(0.5*20/4)
  assert dropped(train=False) == pytest.approx(1 - 15 / 20)   # C = ceil(3*20/4)
  # An explicit factor overrides both; 'dropless' (C = S) drops nothing.
  assert dropped(train=False, capacity_factor=1.0) == pytest.approx(1 - 5 / 20)
  assert dropped(train=True, capacity_factor='dropless') == 0.0


# --- Shared experts ---------------------------------------------------------------------------

def test_shared_experts_add_an_always_active_swiglu():
  kw = dict(num_experts=4, top_k=1, group_size=10, train_capacity_factor=0.5)
  plain, shared = _layer(**kw), _layer(num_shared_experts=2, **kw)
  assert plain.shared is None
  assert shared.shared.w_gate.shape == (11, 2 * 7)   # two experts of width F
  for name in ('w_router', 'w_gate', 'w_up', 'w_down'):   # same routed experts
    getattr(shared, name)[...] = getattr(plain, name)[...]
  x = _normal(11, 4, 5, 11)
  y0, _ = _apply(plain, x, train=True)
  y1, _ = _apply(shared, x, train=True)
  s = shared.shared
  mlp = swiglu(x, s.w_gate[...], s.w_up[...], s.w_down[...], jnp.float32)
  assert np.abs(np.asarray(mlp)).max() > 1e-2
  np.testing.assert_allclose(y1 - y0, mlp, **TOL)
  # Tokens dropped by the router (zero routed output) still get the shared MLP.
  dropped = np.all(np.asarray(y0) == 0, axis=-1)
  assert dropped.any()
  np.testing.assert_allclose(np.asarray(y1)[dropped], np.asarray(mlp)[dropped], **TOL)
  n_params = sum(v.size for v in jax.tree.leaves(nnx.state(shared, nnx.Param)))
  assert n_params == 11 * 4 + 4 * 3 * 11 * 7 + 2 * 3 * 11 * 7


# --- Balance bias -------------------------------------------------------------------------------

def test_balance_bias_is_state_not_a_parameter():
  layer = _layer(num_experts=4, group_size=10, balance_bias_rate=0.01)
  assert isinstance(layer.balance_bias, BalanceBias)
  assert not isinstance(layer.balance_bias, nnx.Param)
  params = nnx.state(layer, nnx.Param)
  assert 'balance_bias' not in params
  assert sum(v.size for v in jax.tree.leaves(params)) == 11 * 4 + 3 * 4 * 11 * 7
  assert 'balance_bias' in nnx.state(layer, BalanceBias)


def _skewed(layer, seed=12):
  x = _normal(seed, 8, 5, 11)
  x = x.at[..., 0].set(1.0)                          # a constant feature...
  w = layer.w_router[...]
  layer.w_router[...] = w.at[0].set(jnp.asarray([1.5, 0.5, 0.0, -0.5]))  # ...favours e0
  return x


def test_balance_bias_update_direction_and_balancing_effect():
  layer = _layer(num_experts=4, top_k=1, group_size=40, balance_bias_rate=0.02,
                 eval_capacity_factor=4.0)
  x = _skewed(layer)
  _, stats = _apply(layer, x)
  load0 = np.asarray(stats.expert_load)
  ratio0 = load0.max() / load0.mean()
  assert ratio0 > 1.8                                 # really skewed
  layer.update_balance_bias(stats.expert_load)
  bias = np.asarray(layer.balance_bias[...])
  np.testing.assert_allclose(bias, 0.02 * np.sign(load0.mean() - load0))
  assert bias[np.argmax(load0)] < 0 and bias[np.argmin(load0)] > 0
  ratios = [ratio0]
  for _ in range(40):
    _, stats = _apply(layer, x)
    ratios.append(float(stats.expert_load.max() / stats.expert_load.mean()))
    layer.update_balance_bias(stats.expert_load)
  assert min(ratios[-10:]) < 1.5 and max(ratios[-10:]) < ratio0 * 0.8, ratios


def test_balance_bias_is_ignored_when_off():
  layer = _layer(num_experts=4, top_k=1, group_size=40)  # balance_bias_rate = 0
  x = _skewed(layer)
  y, stats = _apply(layer, x)
  layer.update_balance_bias(stats.expert_load)
  np.testing.assert_array_equal(layer.balance_bias[...], 0.0)
  layer.balance_bias[...] = jnp.asarray([-5.0, 5.0, 0.0, 0.0])
  np.testing.assert_array_equal(_apply(layer, x)[0], y)


# --- bfloat16 -----------------------------------------------------------------------------------

@pytest.mark.parametrize('path', ['einsum', 'gather'])
def test_bfloat16_compute_with_float32_router(path):
  kw = dict(num_experts=4, top_k=2, group_size=10, dispatch=path,
            train_capacity_factor=0.75)
  l16, l32 = _layer(dtype='bfloat16', **kw), _layer(**kw)
  x = _normal(13, 4, 5, 11, dtype=jnp.bfloat16)
  y16, s16 = _apply(l16, x, train=True)
  y32, s32 = _apply(l32, x.astype(jnp.float32), train=True)
  assert y16.dtype == jnp.bfloat16
  assert l16.w_gate[...].dtype == jnp.float32        # params stay float32
  for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)):  # float32, identical
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32))
  assert err.max() < 0.05 * np.abs(np.asarray(y32)).max()


# --- Initialization ---------------------------------------------------------------------------

def test_expert_init_scale_does_not_shrink_with_num_experts():
  """Each expert is initialized like a dense SwiGLU: std 1/sqrt(D) in, 1/sqrt(F)
  out, whatever E (fan-in over the expert axis too made experts sqrt(E) smaller)."""
  d, f = 64, 32
  cfg = ModelConfig(256, d_model=d, moe=MoeConfig(num_experts=16, expert_dim=f))
  stds = jax.jit(lambda key: jax.tree.map(
      jnp.std, nnx.state(MoeFeedForward(cfg, key), nnx.Param)))(jax.random.key(0))
  for name, want in (('w_gate', d), ('w_up', d), ('w_down', f), ('w_router', d)):
    assert abs(float(stds[name][...]) * np.sqrt(want) - 1) < 0.05, name
