"""Adaptive compute: cheap experts (zero, copy, constant) and threshold
(top-p) routing against a hand-written oracle on every dispatch path, the
aux-loss rule, the compute regularizer, the evaluation override, and an
expert-parallel mesh against one device."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
import sharded_setup
from test_moe_layer import _layer as random_layer
from moe import routing
from moe.config import ConfigError, ModelConfig, MoeConfig
from moe.moe_layer import MoeFeedForward, from_groups, to_groups

TOL = dict(rtol=2e-5, atol=2e-5)
PATHS = ('einsum', 'gather', 'dropless')
B, T, D = 4, 5, 11          # 2 groups of 2 sequences: S = 10


def _layer(seed=0, **moe_kw):
  """A layer with numpy-drawn parameters (constant vectors included) and
  routing groups of 10 tokens."""
  moe_kw.setdefault('group_size', 10)
  return random_layer(d=D, seed=seed, **moe_kw)


def _normal(seed, *shape):
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, params, rest, x, compute=None):
  return nnx.merge(graphdef, params, rest)(x, train=True, compute=compute)


def _run(layer, x, compute=None):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  return _forward(graphdef, params, rest, x, compute)


# --- Against the oracle --------------------------------------------------------------

ORACLE_CASES = {
    # 4 FFN experts + 2 zero + 2 copy + 1 constant, top-2, tight capacity.
    'cheap': dict(num_experts=4, top_k=2, num_zero_experts=2, num_copy_experts=2,
                  num_const_experts=1, train_capacity_factor=0.75),
    # Threshold routing over 4 FFN experts, at most 3 each.
    'top_p': dict(num_experts=4, top_k=3, top_p=0.6, train_capacity_factor=0.75),
    # Both: a token may stop after a cheap first choice.
    'cheap_top_p': dict(num_experts=4, top_k=3, top_p=0.5, num_zero_experts=1,
                        num_copy_experts=1, num_const_experts=1,
                        train_capacity_factor=0.5),
}


@pytest.mark.parametrize('case', sorted(ORACLE_CASES))
def test_adaptive_layer_equals_oracle_on_every_path(case):
  kw = ORACLE_CASES[case]
  x, cot = _normal(1, B, T, D), _normal(2, B, T, D)
  layers = {p: _layer(dispatch=p, seed=5, **kw) for p in PATHS}
  lay = layers['gather']
  m = lay.moe_cfg
  c = m.capacity(10, train=True)
  const = (lay.const_vectors[...] if m.num_const_experts
           else jnp.zeros((0, D), jnp.float32))
  w = [lay.w_router[...], lay.w_gate[...], lay.w_up[...], lay.w_down[...], const]
  probs = oracle.probs_of(to_groups(x, 2), w[0])
  asg = oracle.assign_adaptive(probs, m.num_experts, m.top_k, c, m.top_p)
  ffn_taken = asg.taken & (asg.choices < m.num_experts)
  # The case means something: drops, untaken or cheap choices, full buffers.
  assert (ffn_taken & ~asg.kept).any()
  assert (~ffn_taken).any()
  assert max(len(b) for bg in asg.buffers for b in bg) == c

  names = ['w_router', 'w_gate', 'w_up', 'w_down'] + (
      ['const_vectors'] if m.num_const_experts else [])
  for path, layer in layers.items():
    # The dropless path has room for every choice (capacity S).
    asg = oracle.assign_adaptive(probs, m.num_experts, m.top_k,
                                 layer.moe_cfg.capacity(10, train=True), m.top_p)

    def ref(x, *w, asg=asg):
      return from_groups(oracle.oracle_adaptive(
          to_groups(x, 2), *w, asg, m.num_zero_experts, m.num_copy_experts), 2, T)
    y_ref, vjp = jax.vjp(ref, x, *w)
    g_ref = vjp(cot)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    (y, stats), vjp = jax.vjp(lambda x, p: _forward(graphdef, p, rest, x), x, params)
    gx, gp = vjp((cot, jax.tree.map(jnp.zeros_like, stats)))
    np.testing.assert_allclose(y, y_ref, err_msg=path, **TOL)
    np.testing.assert_allclose(gx, g_ref[0], err_msg=path, **TOL)
    for name, gr in zip(names, g_ref[1:]):
      np.testing.assert_allclose(gp[name][...], gr, err_msg=f'{path} {name}', **TOL)
    # The statistics count what the oracle did.
    np.testing.assert_allclose(stats.ffn_per_token, ffn_taken.sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        stats.dropped_fraction, (ffn_taken & ~asg.kept).sum() / ffn_taken.sum(), rtol=1e-6)
    share = np.bincount(ffn_taken.sum(-1).ravel(), minlength=m.top_k + 1) / ffn_taken[..., 0].size
    np.testing.assert_allclose(stats.ffn_count_share, share, rtol=1e-6)


@pytest.mark.parametrize('path', PATHS)
def test_zero_expert_outputs_nothing_and_copy_expert_its_input(path):
  """Top-1 over 3 FFN experts + 1 zero + 1 copy, the router's columns for
  the cheap experts set so that half the tokens pick each: exactly zero,
  and exactly gate * x."""
  layer = _layer(dispatch=path, num_experts=3, top_k=1, num_zero_experts=1,
                 num_copy_experts=1, train_capacity_factor=1.0)
  x = _normal(3, B, T, D)
  w = np.asarray(layer.w_router[...]).copy()
  w[:, :3] = 0.0                                  # FFN experts: logit 0
  w[:, 3], w[:, 4] = 5.0 * np.eye(D)[0], -5.0 * np.eye(D)[0]  # by the sign of x[..., 0]
  layer.w_router[...] = jnp.asarray(w)
  y, stats = _run(layer, x)
  xs = np.asarray(x)
  logits = np.stack([np.zeros_like(xs[..., 0])] * 3 + [5 * xs[..., 0], -5 * xs[..., 0]], -1)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  zero, copy = xs[..., 0] > 0, xs[..., 0] < 0
  assert zero.sum() >= 5 and copy.sum() >= 5 and np.all(zero | copy)
  assert np.all(np.asarray(y)[zero] == 0.0)
  np.testing.assert_allclose(np.asarray(y)[copy], (xs * p[..., 4:5])[copy], rtol=1e-6)
  assert float(stats.ffn_per_token) == 0.0
  np.testing.assert_allclose(stats.cheap_share, [zero.mean(), copy.mean()], rtol=1e-6)
  assert float(stats.dropped_fraction) == 0.0    # no FFN choice, none dropped


def test_cheap_choices_take_no_slot_and_no_buffer():
  """C = 2 for each FFN expert (cf 1, k 2, S 10, E 4 + 6 cheap: expected
  1.0 FFN choice per token... min 2 by min_capacity): every FFN choice fits
  although the k*S choices are far more than E*C; cheap choices are never
  kept, and the capacity comes from the expected FFN choices."""
  m = MoeConfig(num_experts=4, top_k=2, num_zero_experts=3, num_copy_experts=3,
                group_size=10, train_capacity_factor=1.0, min_capacity=1)
  assert m.ffn_choices == pytest.approx(2 * 4 / 10)
  assert m.capacity(10, train=True) == 2              # ceil(1.0 * 0.8 * 10 / 4)
  logits = jnp.asarray(np.random.RandomState(0).standard_normal((3, 10, 10)) * 0.1,
                       jnp.float32)
  logits = logits.at[..., 4:].add(5.0)                # every token: two cheap choices
  for i in range(4):                                  # the first 4: experts i, i + 1
    logits = logits.at[:, i, i].add(10.0).at[:, i, (i + 1) % 4].add(9.0)
  r, stats = routing.tokens_choose(logits, m, 2)
  ffn = np.asarray(r.expert_index) < 4
  assert not np.asarray(r.kept)[~ffn].any()
  assert ffn.sum() == 3 * 4 * 2 and float(stats.dropped_fraction) == pytest.approx(0.0)
  assert float(stats.ffn_per_token) == pytest.approx(0.8)
  np.testing.assert_allclose(stats.ffn_count_share, [0.6, 0.0, 0.4])


# --- Threshold routing ------------------------------------------------------------------

def test_threshold_takes_choices_until_their_probability_reaches_p():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  logits = jnp.asarray(np.log(probs))[None, None]
  for p, want in ((0.3, 1), (0.5, 1), (0.7, 2), (0.8, 2), (0.9, 3), (0.99, 3)):
    m = MoeConfig(num_experts=4, top_k=3, top_p=p, group_size=1)
    r, stats = routing.tokens_choose(logits, m, 4)
    assert int(np.asarray(r.kept).sum()) == want, p
    # Untaken choices name no expert.
    assert np.asarray(r.expert_index)[0, 0].tolist() == [0, 1, 2][:want] + [-1] * (3 - want)
    np.testing.assert_allclose(np.asarray(r.gate)[0, 0, :want], probs[:want], rtol=1e-6)
    assert np.all(np.asarray(r.gate)[0, 0, want:] == 0.0)
    assert float(stats.ffn_per_token) == want


@pytest.mark.parametrize('path', PATHS)
def test_threshold_one_equals_fixed_top_k(path):
  """p = 1 with k_max = k: the same routing and output as fixed top-k (the
  aux loss is written over the FFN choices made, so equal up to rounding)."""
  x = _normal(4, B, T, D)
  fixed = _layer(dispatch=path, num_experts=4, top_k=2, train_capacity_factor=0.75)
  thresh = _layer(dispatch=path, num_experts=4, top_k=2, top_p=1.0,
                  train_capacity_factor=0.75)
  (y0, s0), (y1, s1) = _run(fixed, x), _run(thresh, x)
  np.testing.assert_array_equal(y0, y1)
  for name in ('expert_load', 'ffn_per_token', 'ffn_count_share'):
    np.testing.assert_array_equal(getattr(s0, name), getattr(s1, name), err_msg=name)
  for name in ('dropped_fraction', 'aux_loss'):
    np.testing.assert_allclose(getattr(s0, name), getattr(s1, name), rtol=1e-6, err_msg=name)
  assert float(s0.dropped_fraction) > 0 or path == 'dropless'


# --- The aux loss and the compute regularizer ---------------------------------------------

def test_aux_loss_balances_ffn_experts_only():
  """1.0 when the FFN choices are uniform over the FFN experts, however much
  goes to the cheap experts; no gradient on the cheap experts' logits."""
  e, n = 4, 7
  m = MoeConfig(num_experts=e, top_k=2, num_zero_experts=3, group_size=8)
  rs = np.random.RandomState(1)
  logits = jnp.asarray(rs.standard_normal((2, 8, n)), jnp.float32)

  def aux(logits):
    return routing.tokens_choose(logits, m, 8)[1].aux_loss
  grad = jax.grad(aux)(logits)
  assert np.abs(np.asarray(grad)[..., :e]).max() > 1e-4
  np.testing.assert_allclose(np.asarray(grad)[..., e:], 0.0, atol=1e-7)
  # Uniform FFN probabilities, FFN choices spread evenly, half the mass cheap.
  probs = jnp.full((1, 4, n), 0.5 / e).at[..., e:].set(0.5 / 3)
  index = jnp.asarray([[[0, 4], [1, 5], [2, 6], [3, 4]]])
  ffn = index < e
  assert float(routing.aux_loss(probs, index, e, 'group', ffn)) == pytest.approx(1.0)
  # All FFN choices and FFN mass on one expert: E.
  probs = probs.at[..., 1:e].set(0.0).at[..., 0].set(0.5)
  index = jnp.asarray([[[0, 4], [0, 5], [0, 6], [0, 4]]])
  assert float(routing.aux_loss(probs, index, e, 'group', index < e)) == pytest.approx(e)


def test_compute_loss_value_and_direction():
  """(n - target)^2 in value; its gradient moves router mass onto the cheap
  experts when tokens take too many FFN experts, and away when too few."""
  rs = np.random.RandomState(2)
  logits = jnp.asarray(rs.standard_normal((2, 16, 6)), jnp.float32)
  for target, sign in ((0.5, -1), (2.0, +1)):
    m = MoeConfig(num_experts=4, top_k=2, num_zero_experts=1, num_copy_experts=1,
                  group_size=16, compute_target=target, compute_loss_coef=1.0)
    _, stats = routing.tokens_choose(logits, m, 16)
    assert float(stats.compute_loss) == pytest.approx(
        (float(stats.ffn_per_token) - target) ** 2, rel=1e-6)
    g = jax.grad(lambda l: routing.tokens_choose(l, m, 16)[1].compute_loss)(logits)
    # d loss / d(cheap logits): negative (raise them) when n > target.
    assert sign * float(np.asarray(g)[..., 4:].sum()) > 0


@pytest.mark.parametrize('kind', ['cheap', 'top_p'])
def test_compute_regularizer_steers_the_mean_to_its_target(kind):
  """Router logits trained on the regularizer alone reach the target mean
  FFN experts per token from far above it."""
  kw = (dict(num_zero_experts=2, num_copy_experts=2) if kind == 'cheap'
        else dict(top_p=0.9))
  m = MoeConfig(num_experts=4, top_k=2, group_size=64, compute_target=1.0,
                compute_loss_coef=1.0, **kw)
  rs = np.random.RandomState(3)
  x = jnp.asarray(rs.standard_normal((4, 64, 8)), jnp.float32)
  w = jnp.zeros((8, m.num_choices), jnp.float32)
  bias = jnp.zeros((m.num_choices,)).at[:4].set(3.0)   # start on the FFN experts

  def stats(params):
    return routing.tokens_choose(x @ params[0] + params[1], m, 64)[1]

  @jax.jit
  def step(params):
    g = jax.grad(lambda p: stats(p).compute_loss)(params)
    return jax.tree.map(lambda a, b: a - 0.5 * b, params, g)
  params = (w, bias)
  start = float(stats(params).ffn_per_token)
  assert start >= 1.8
  for _ in range(150):
    params = step(params)
  assert abs(float(stats(params).ffn_per_token) - 1.0) < 0.15


# --- Evaluation's compute override ---------------------------------------------------------

def test_compute_override_switches_cheap_experts_off_and_sets_the_threshold():
  layer = _layer(dispatch='gather', num_experts=4, top_k=2, num_zero_experts=2,
                 num_copy_experts=1, train_capacity_factor=2.0)
  x = _normal(6, B, T, D)
  _, s = _run(layer, x)
  assert 0 < float(s.ffn_per_token) < 2
  _, off = _run(layer, x, routing.ComputeOverride(cheap_experts=False))
  assert float(off.ffn_per_token) == 2.0 and off.cheap_share.shape == (0,)
  _, low = _run(layer, x, routing.ComputeOverride(top_p=0.01))
  assert float(low.ffn_per_token) <= 1.0
  # Switched off means: the FFN experts only, as a model without cheap ones.
  plain = _layer(dispatch='gather', num_experts=4, top_k=2, train_capacity_factor=2.0)
  plain.w_router[...] = layer.w_router[...][:, :4]
  for name in ('w_gate', 'w_up', 'w_down'):
    getattr(plain, name)[...] = getattr(layer, name)[...]
  np.testing.assert_allclose(_run(plain, x)[0],
                             _run(layer, x, routing.ComputeOverride(cheap_experts=False))[0],
                             rtol=1e-6, atol=1e-6)


def test_compute_what_if_rows_and_refusals():
  fixed2 = MoeConfig(top_k=2)
  cheap = MoeConfig(top_k=2, num_zero_experts=2, num_copy_experts=2)
  thresh = MoeConfig(top_k=2, top_p=0.5)
  labels = lambda cfg, spec: [l for l, _ in routing.compute_what_if(cfg, spec)]
  assert labels(MoeConfig(), ('auto',)) == [] and labels(fixed2, ('auto',)) == []
  auto = ['as trained'] + [f'top_p={p}' for p in routing.AUTO_THRESHOLDS]
  assert labels(thresh, ('auto',)) == auto
  assert labels(cheap, ('auto',)) == auto + ['no cheap experts']
  rows = routing.compute_what_if(fixed2, (0.5, 1))      # asked for explicitly
  assert [o.top_p for _, o in rows] == [0.5, 1.0]
  for cfg, spec, message in [
      (cheap, (1.5,), 'has 1.5'), (cheap, ('all',), "has 'all'"),
      (fixed2, ('no_cheap',), 'no cheap experts'),
      (MoeConfig(router='experts_choose'), (0.5,), "needs moe.router='tokens_choose'"),
      (MoeConfig(num_experts=2, top_k=3, num_zero_experts=2), ('no_cheap',),
       'between 1 and moe.num_experts=2')]:
    with pytest.raises(ConfigError, match=message):
      routing.compute_what_if(cfg, spec)


# --- Config --------------------------------------------------------------------------------

@pytest.mark.parametrize('kw,message', [
    (dict(num_zero_experts=-1), 'num_zero_experts=-1'),
    (dict(top_p=1.5), 'top_p=1.5'),
    (dict(compute_loss_coef=0.1), 'set compute_target'),
    (dict(compute_target=1.0), 'needs adaptive routing'),
    (dict(top_p=0.5, top_k=2, compute_target=3.0), 'at most moe.top_k=2'),
    (dict(router='experts_choose', num_copy_experts=1), "takes no cheap experts"),
    (dict(top_k=9), 'between 1 and moe.num_experts=8'),
    (dict(top_k=11, num_zero_experts=2), "between 1 and the router's 10 choices"),
])
def test_bad_adaptive_config_is_refused(kw, message):
  with pytest.raises(ConfigError, match=message):
    MoeConfig(**kw)


def test_counts_and_flops_follow_the_ffn_choices():
  base = ModelConfig(256, d_model=16, num_layers=2, num_heads=2, head_dim=8, max_seq_len=8,
                     moe_every=1, moe=MoeConfig(num_experts=8, top_k=1, expert_dim=12))
  cheap = ModelConfig(**{**base.__dict__, 'moe': MoeConfig(
      num_experts=8, top_k=2, expert_dim=12, num_zero_experts=4, num_copy_experts=2,
      num_const_experts=2)})
  assert cheap.moe.ffn_choices == 1.0
  router_extra = 2 * 16 * 8                      # 8 more router columns, 2 layers
  assert cheap.num_active_params == base.num_active_params + router_extra
  assert cheap.num_params == base.num_params + router_extra + 2 * 2 * 16
  built = nnx.eval_shape(lambda: MoeFeedForward(cheap, jax.random.key(0)))
  assert sum(a.size for a in jax.tree.leaves(nnx.state(built, nnx.Param))) == (
      (cheap.num_params - base.num_params) // 2 + sum(
          a.size for a in jax.tree.leaves(nnx.state(
              nnx.eval_shape(lambda: MoeFeedForward(base, jax.random.key(0))), nnx.Param))))
  f = cheap.flops_per_token(8)
  assert cheap.flops_per_token(8, [1.0, 1.0]) == f
  assert cheap.flops_per_token(8, [0.5, 1.5]) == f
  assert cheap.flops_per_token(8, [0.0, 0.0]) == pytest.approx(f - 2 * 6 * 3 * 16 * 12)


# --- An expert-parallel mesh ------------------------------------------------------------------

MESH_MOE = (('num_zero_experts', 4), ('num_copy_experts', 2), ('num_const_experts', 2),
            ('top_p', 0.9), ('compute_target', 1.0), ('compute_loss_coef', 0.1))


@functools.cache
def _step(mesh_shape, dispatch, moe_kw):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  s, state = sharded_setup.build(mesh_shape, dispatch, devices, moe_kw=moe_kw)
  tokens = jax.device_put(sharded_setup.batches(1)[0], s.batch_sharding)
  compiled = sharded_setup.loss_and_grads(s).lower(state, tokens).compile()
  loss, metrics, grads = compiled(state, tokens)
  return (float(loss), jax.tree.map(np.asarray, grads), metrics['router'],
          compiled.as_text())


@pytest.mark.parametrize('mesh_shape,dispatch', [((2, 4, 1), 'gather'), ((1, 8, 1), 'dropless')])
def test_adaptive_mesh_equals_single_device(mesh_shape, dispatch):
  loss, grads, stats, _ = _step(mesh_shape, dispatch, MESH_MOE)
  ref_loss, ref_grads, ref_stats, _ = _step((1, 1, 1), dispatch, MESH_MOE)
  assert 0 < float(stats.ffn_per_token.mean()) < 2
  assert float(stats.cheap_share.sum(-1).mean()) > 0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(stats.ffn_per_token, ref_stats.ffn_per_token, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)


def test_cheap_choices_add_no_all_to_all_bytes():
  """The compiled step's all-to-alls on a (2, 4, 1) mesh: top-2 over 8 FFN
  + 8 cheap experts (1.0 expected FFN choice) moves exactly the bytes of
  top-1 over the 8 FFN experts, and half those of fixed top-2."""
  def a2a_bytes(moe_kw):
    hlo = _step((2, 4, 1), 'gather', moe_kw)[3]
    return sum(n for n, _ in sharded_setup.all_to_alls(hlo))
  cheap = a2a_bytes((('num_zero_experts', 4), ('num_copy_experts', 2),
                     ('num_const_experts', 2)))
  assert cheap > 0
  assert cheap == a2a_bytes((('top_k', 1),))
  assert cheap * 2 == a2a_bytes(())


# --- End to end: train, eval's compute what-if, the routes analysis --------------------

def test_adaptive_run_eval_compute_what_if_and_routes(data_dir, tmp_path):
  """configs/adaptive.py:cpu, shrunk, trained 3 steps: the logged FLOPs per
  token follow the experts taken; eval.py's compute what-if goes from few
  FFN experts (p = 0.3) to all top-k choices (p = 1) and to exactly k with
  the cheap experts off, with its plot; the routes analysis shows where the
  compute went."""
  import warnings
  from configs import adaptive
  from moe import eval_lib, report, routes_report, run_config, train_lib
  from tiny import loop_settings, read_jsonl, shrink_trunk
  c = loop_settings(shrink_trunk(adaptive.get_config('cpu')), data_dir, num_steps=3)
  c.batch_size = 16              # 8 groups of 2 sequences: one per device
  c.moe.group_size = 64
  c.eval.capacity_factors = (2.0,)
  c.eval.compute_what_if = ('as_trained', 0.3, 1.0, 'no_cheap')
  workdir = str(tmp_path)
  run = run_config.build(c)
  train_lib.train(run, workdir)
  model = run.model
  lines = [l for l in read_jsonl(workdir) if 'ffn_experts_per_token' in l and 'loss' in l]
  for l in lines[1:]:   # step 1 only starts the throughput interval
    assert l['flops_per_token'] == pytest.approx(
        model.flops_per_token(c.seq_len, l['per_layer/ffn_experts_per_token']))
  # The reports read the start's nominal figure as info and keep every
  # train row, although those carry the FLOPs the tokens took.
  info, train, _, final = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert info['flops_per_token'] == model.flops_per_token(c.seq_len)
  assert sorted(train) == [1, 2, 3] and 'flops_per_token' in train[3]
  assert final['ffn_experts_per_token'] > 0
  result = eval_lib.run_eval(run, workdir)
  rows = {r['setting']: r for r in result['compute_what_if']}
  assert list(rows) == ['as trained', 'top_p=0.3', 'top_p=1.0', 'no cheap experts']
  assert rows['no cheap experts']['ffn_experts_per_token'] == 2.0
  assert (rows['top_p=0.3']['ffn_experts_per_token']
          <= rows['as trained']['ffn_experts_per_token']
          <= rows['top_p=1.0']['ffn_experts_per_token'] < 2.0)
  for r in rows.values():
    assert r['forward_flops_per_token'] == pytest.approx(
        model.flops_per_token(c.seq_len, r['per_layer/ffn_experts_per_token']) / 3)
  assert os.path.getsize(os.path.join(workdir, 'compute_what_if.png')) > 1000
  assert 'FFN experts per token' in eval_lib.format_table(result)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    res = routes_report.run(run, workdir, stability=False)
  assert res['adaptive'] and res['num_ffn_experts'] == 8
  assert len(res['layers'][0]['expert_load']) == 16      # FFN and cheap experts
  assert len(res['compute']['by_loss_bin']) == model.num_moe_layers
  assert os.path.getsize(os.path.join(workdir, 'routes', 'compute.png')) > 1000
  assert 'Where the compute went' in open(os.path.join(workdir, 'routes', 'routes.md')).read()
