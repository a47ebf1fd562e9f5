"""Every dispatch path ('einsum', 'gather', 'dropless') against the naive
per-expert loop oracle (tests/oracle.py): forward and gradients w.r.t. the tokens, the expert
weights and the router weight, with capacities tight enough to drop tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import dispatch, routing
from moe.config import MoeConfig

import oracle

G, T, SPG, D, F = 2, 5, 2, 11, 7      # groups of S = 10 tokens, prime-ish dims
S = T * SPG
TOL = dict(rtol=2e-5, atol=2e-5)

# (E, k, capacity factor): E*C < k*S in every case, so every group drops.
CASES = [(1, 1, 0.5), (3, 1, 0.75), (8, 1, 0.75), (3, 2, 0.75), (8, 2, 0.75)]


def _cfg(e, k, cf, **kw):
  return MoeConfig(num_experts=e, top_k=k, expert_dim=F, group_size=S,
                   train_capacity_factor=cf, eval_capacity_factor=cf,
                   min_capacity=1, **kw)


def _library(x, wr, wg, wu, wd, *, cfg, capacity, path):
  logits = routing.router_logits(x, wr, cfg=cfg, train=False, rng=None)
  r, _ = routing.route(logits, cfg, capacity)
  return dispatch.DISPATCHES[path](x, r, dispatch.ExpertWeights(wg, wu, wd),
                                   jnp.float32)


def _value_and_grads(fn, args, cot):
  """fn(*args) and the gradients of sum(fn(*args) * cot) w.r.t. all args."""
  y, vjp = jax.vjp(fn, *args)
  return y, vjp(cot)


@functools.partial(jax.jit, static_argnames=('cfg', 'capacity'))
def _library_vg(args, cot, *, cfg, capacity):
  """{path: (y, grads)} for every dispatch path (one compilation); the
  dropless path honours the same `kept` mask when given a capacity."""
  return {path: _value_and_grads(
      functools.partial(_library, cfg=cfg, capacity=capacity, path=path), args, cot)
          for path in ('einsum', 'gather', 'dropless')}


@functools.partial(jax.jit, static_argnames=('cfg', 'capacity'))
def _routing(x, wr, *, cfg, capacity):
  return routing.route(routing.router_logits(x, wr, cfg=cfg, train=False, rng=None),
                       cfg, capacity)[0]


NAMES = ('x', 'w_router', 'w_gate', 'w_up', 'w_down')


def _check_every_path(cfg, c, args, asg, renormalize=False):
  """Forward and all five gradients of every path equal the oracle's."""
  r = _routing(*args[:2], cfg=cfg, capacity=c)
  np.testing.assert_array_equal(np.asarray(r.kept), asg.kept)
  np.testing.assert_array_equal(np.asarray(r.expert_index), asg.choices)
  cot = jnp.asarray(np.random.RandomState(99).standard_normal(args[0].shape), jnp.float32)
  y_ref, g_ref = _value_and_grads(
      lambda *a: oracle.oracle_moe(*a, asg, renormalize=renormalize), args, cot)
  for path, (y, g_lib) in _library_vg(args, cot, cfg=cfg, capacity=c).items():
    np.testing.assert_allclose(y, y_ref, err_msg=path, **TOL)
    for name, gl, gr in zip(NAMES, g_lib, g_ref):
      np.testing.assert_allclose(gl, gr, err_msg=f'{path} d/d{name}', **TOL)
  return y_ref, g_ref


@pytest.mark.parametrize('e,k,cf', CASES)
def test_tokens_choose_both_paths_equal_oracle(e, k, cf):
  cfg = _cfg(e, k, cf)
  c = cfg.capacity(S, train=True)
  args = oracle.random_problem(e * 10 + k, G, S, D, e, F,
                               router_scale=3.0)
  asg = oracle.assign_tokens_choose(oracle.probs_of(*args[:2]), k, c)
  # The case is meaningful: choices dropped, at least half kept, a buffer full.
  assert asg.num_dropped > 0
  assert asg.kept.mean() >= 0.5
  assert max(len(b) for bg in asg.buffers for b in bg) == c
  y_ref, g_ref = _check_every_path(cfg, c, args, asg)
  # Tokens with all k choices dropped get exactly zero MoE output.
  all_dropped = ~asg.kept.any(-1)
  assert np.all(np.asarray(y_ref)[all_dropped] == 0)
  # The reference gradients are not trivially zero (so equality means something).
  for name, gr in zip(NAMES, g_ref):
    if name == 'w_router' and e == 1:   # softmax over one expert: gate == 1
      np.testing.assert_array_equal(gr, 0.0)
    else:
      assert np.abs(np.asarray(gr)).max() > 1e-3, name


def test_renormalized_top2_gates_equal_oracle():
  cfg = _cfg(3, 2, 0.6, renormalize_gates=True)
  c = cfg.capacity(S, train=True)
  args = oracle.random_problem(7, G, S, D, 3, F, router_scale=3.0)
  asg = oracle.assign_tokens_choose(oracle.probs_of(*args[:2]), 2, c)
  assert asg.num_dropped > 0
  _check_every_path(cfg, c, args, asg, renormalize=True)


def test_experts_choose_both_paths_equal_oracle():
  e = 3
  cfg = _cfg(e, 1, 0.5, router='experts_choose')
  c = cfg.capacity(S, train=True)                  # ceil(0.5 * 10 / 3) = 2
  assert c == 2
  args = oracle.random_problem(3, G, S, D, e, F, router_scale=3.0)
  asg = oracle.assign_experts_choose(oracle.probs_of(*args[:2]), c)
  assert (~asg.kept.any(-1)).any()                 # some tokens get no expert
  _check_every_path(cfg, c, args, asg)


def test_einsum_dispatch_tensor_is_a_partial_permutation():
  """Every buffer slot holds at most one token, every kept choice exactly one slot."""
  cfg = _cfg(3, 2, 0.75)
  c = cfg.capacity(S, train=True)
  x, wr, *_ = oracle.random_problem(5, G, S, D, 3, F, router_scale=3.0)
  r = _routing(x, wr, cfg=cfg, capacity=c)
  # Rebuild the [G, S, E, C] dispatch mask from the Routing by hand.
  mask = np.zeros((G, S, 3, c), int)
  ei, sl, kp = map(np.asarray, (r.expert_index, r.slot, r.kept))
  for g, s, kk in zip(*np.nonzero(kp)):
    mask[g, s, ei[g, s, kk], sl[g, s, kk]] += 1
  assert mask.max() == 1
  assert np.all(mask.sum(1) <= 1)                  # one token per slot
  assert mask.sum() == kp.sum()
  # Used slots of each expert are exactly 0..n-1 (buffers fill from the front).
  used = mask.sum(1)                                # [G, E, C]
  for g in range(G):
    for e in range(3):
      n = used[g, e].sum()
      np.testing.assert_array_equal(used[g, e], np.arange(c) < n)


def test_expert_ffn_matches_per_expert_swiglu():
  e = 3
  x = jnp.asarray(np.random.RandomState(0).standard_normal((2, e, 4, D)), jnp.float32)
  _, _, wg, wu, wd = oracle.random_problem(1, 1, 1, D, e, F)
  y = dispatch.expert_ffn(x, dispatch.ExpertWeights(wg, wu, wd), jnp.float32)
  for g in range(2):
    for i in range(e):
      np.testing.assert_allclose(y[g, i], oracle.swiglu_ref(x[g, i], wg[i], wu[i], wd[i]),
                                 **TOL)


# --- Dropless ----------------------------------------------------------------------

@pytest.mark.parametrize('e,k', [(1, 1), (3, 1), (8, 1), (3, 2), (8, 2)])
def test_dropless_equals_oracle_with_infinite_capacity(e, k):
  cfg = _cfg(e, k, 1.0, dispatch='dropless')
  c = cfg.capacity(S, train=True)
  assert c == S                                   # room for every token
  args = oracle.random_problem(e * 10 + k + 5, G, S, D, e, F, router_scale=3.0)
  asg = oracle.assign_tokens_choose(oracle.probs_of(*args[:2]), k, c)
  assert asg.kept.all()
  _check_every_path(cfg, c, args, asg)


@pytest.mark.parametrize('k', [1, 2])
def test_dropless_adversarial_routing_every_token_to_one_expert(k):
  """A router that sends every token's first choice to expert 2: the capacity
  paths drop most tokens at cf 1.25, dropless keeps them all."""
  e = 4
  cfg = _cfg(e, k, 1.0, dispatch='dropless')
  args = list(oracle.random_problem(11 + k, G, S, D, e, F))
  wr = np.zeros((D, e), np.float32)
  wr[:, 2] = 50.0
  args[0] = jnp.abs(args[0]) + 0.1                 # positive inputs: e2 always wins
  args[1] = jnp.asarray(wr)
  probs = oracle.probs_of(*args[:2])
  asg = oracle.assign_tokens_choose(probs, k, S)
  assert (asg.choices[..., 0] == 2).all() and asg.kept.all()
  y_ref, _ = _check_every_path(cfg, S, args, asg)
  tight = oracle.assign_tokens_choose(probs, k, _cfg(e, k, 1.25).capacity(S, train=True))
  assert tight.num_dropped > 0.5 * G * S           # what dropless avoids
  assert np.abs(np.asarray(y_ref)).max(axis=-1).min() > 0   # every token has an output


def test_grouped_ffn_tiles_bound_any_assignment():
  """The static tile buffer holds every assignment, including all rows on
  one expert, and rows marked to skip give exactly zero."""
  from moe import dropless
  n, d, f, e = 37, 5, 6, 4
  rs = np.random.RandomState(0)
  rows = jnp.asarray(rs.standard_normal((n, d)), jnp.float32)
  w = [jnp.asarray(rs.standard_normal(s), jnp.float32) for s in
       ((e, d, f), (e, d, f), (e, f, d))]
  for expert in (np.full(n, 3), rs.randint(0, e + 1, n), np.arange(n) % e):
    out = dropless.grouped_ffn(rows, jnp.asarray(expert), e, *w, jnp.float32)
    for i in range(n):
      want = (np.zeros(d) if expert[i] == e else
              oracle.swiglu_ref(rows[i], w[0][expert[i]], w[1][expert[i]], w[2][expert[i]]))
      np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)
