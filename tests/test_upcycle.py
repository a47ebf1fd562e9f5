"""Sparse upcycling (moe/upcycle.py): an MoE started from a dense checkpoint
with --config.init_from has the dense model's loss at step 0 (ample capacity,
renormalized gates), every expert a copy of the dense MLP, the router at zero;
bad sources are refused before anything runs."""

import json
import os
import sys
import warnings

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import dense as dense_recipe  # noqa: E402
from configs import switch as switch_recipe  # noqa: E402
from moe import checkpoint, data, preflight, run_config, sharding, steps, train_lib  # noqa: E402
from moe.checkpoint import latest_step  # noqa: E402
from moe.config import ConfigError  # noqa: E402
from tiny import loop_settings, read_jsonl, shrink_trunk  # noqa: E402


def _tiny(c, data_dir, *, steps):
  loop_settings(shrink_trunk(c), data_dir, steps)
  c.batch_size = 8
  c.checkpoint_every = steps
  c.optimizer.warmup_steps = 0
  return c


def _moe_config(data_dir, init_from, moe_every=2, **moe):
  """Layer 1 of 2 is MoE (moe_every=2; both with 1): E=4, top-2 with
  renormalized gates, capacity factor E/k = 2 (every expert can hold the
  whole group: nothing drops even though a zero router sends every token to
  experts 0 and 1)."""
  c = _tiny(switch_recipe.get_config('cpu'), data_dir, steps=1)
  c.model.moe_every = moe_every   # 2: layer 0 stays dense, layer 1 is MoE
  c.moe.num_experts = 4
  c.moe.top_k = 2
  c.moe.renormalize_gates = True
  c.moe.expert_dim = 64
  c.moe.group_size = 32
  c.moe.train_capacity_factor = 2.0
  c.moe.eval_capacity_factor = 2.0
  for k, v in moe.items():
    c.moe[k] = v
  c.mesh = (1, 4, 2)          # another mesh than the dense run's (8, 1, 1)
  c.init_from = init_from
  return c


@pytest.fixture(scope='module')
def dense_run(data_dir, tmp_path_factory):
  c = _tiny(dense_recipe.get_config('cpu'), data_dir, steps=2)
  c.mesh = (8, 1, 1)
  workdir = str(tmp_path_factory.mktemp('dense'))
  train_lib.train(run_config.build(c), workdir)
  return c, workdir


def _first_batch(c):
  run = run_config.build(c)
  it = data.train_iterator(run.data, seq_len=c.seq_len, batch_size=c.batch_size,
                           seed=c.seed)
  return next(it)


def _dense_state(c, workdir):
  """(trainer, state) of the trained dense run's newest checkpoint."""
  run = run_config.build(c)
  s = steps.build(run, sharding.make_mesh(run.mesh_shapes(jax.device_count())[0]))
  assert latest_step(workdir) == c.num_steps
  return s, checkpoint.read_state(workdir, c.num_steps, s.abstract_state,
                                  s.state_shardings)


def _dense_loss(c, workdir, tokens):
  """The trained dense model's loss on `tokens` (its newest checkpoint)."""
  s, state = _dense_state(c, workdir)
  batch = data.global_batch(tokens, s.batch_sharding)
  return float(s.eval_step(state, batch)['loss'])


def test_upcycled_loss_at_step_0_equals_dense(dense_run, data_dir, tmp_path):
  dense_c, dense_dir = dense_run
  c = _moe_config(data_dir, dense_dir)
  workdir = str(tmp_path / 'moe')
  train_lib.train(run_config.build(c), workdir)   # one step: its logged loss is the step-0 loss

  (first,) = [r for r in read_jsonl(workdir) if r['step'] == 1 and 'loss' in r]
  tokens = _first_batch(c)
  np.testing.assert_array_equal(tokens, _first_batch(dense_c))  # same data order
  dense_loss = _dense_loss(dense_c, dense_dir, tokens)
  print(f'dense loss {dense_loss:.6f}, upcycled MoE step-0 loss {first["loss"]:.6f}')
  assert first['dropped_fraction'] == 0.0
  assert first['loss'] == pytest.approx(dense_loss, rel=1e-5, abs=1e-6)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['init_from'] == dense_dir


@pytest.mark.parametrize('moe_every', [2, 1])
def test_upcycled_parameters(moe_every, dense_run, data_dir):
  _, dense_dir = dense_run
  c = _moe_config(data_dir, dense_dir, moe_every=moe_every)
  run = run_config.build(c)
  s = steps.build(run, sharding.make_mesh(run.mesh_shapes(jax.device_count())[0]))
  fresh = s.init(jax.random.key(c.seed))
  batch = data.global_batch(_first_batch(c), s.batch_sharding)
  fresh_loss = float(s.eval_step(fresh, batch)['loss'])
  state = steps.fresh_state(s, run)   # initialized, then upcycled
  eval_loss = float(s.eval_step(state, batch)['loss'])
  dense_loss = _dense_loss(dense_run[0], dense_dir, _first_batch(c))
  assert eval_loss == pytest.approx(dense_loss, rel=1e-5, abs=1e-6)
  assert abs(fresh_loss - dense_loss) > 1e-3, (fresh_loss, dense_loss)
  dense_params = _dense_state(dense_run[0], dense_dir)[1].params
  moe = nnx.to_pure_dict(jax.device_get(state.params))
  dense = nnx.to_pure_dict(jax.device_get(dense_params))
  for layer in range(2):
    ffn, dense_ffn = moe['blocks'][layer]['ffn'], dense['blocks'][layer]['ffn']
    if (layer + 1) % moe_every:                 # a layer that stays dense
      assert 'w_router' not in ffn
      for name in ('w_gate', 'w_up', 'w_down'):
        np.testing.assert_array_equal(ffn[name], dense_ffn[name])
      continue
    for name in ('w_gate', 'w_up', 'w_down'):   # every expert is the dense FFN
      assert ffn[name].shape[0] == 4
      for e in range(4):
        np.testing.assert_array_equal(ffn[name][e], dense_ffn[name])
    assert not np.any(ffn['w_router'])
  np.testing.assert_array_equal(moe['embed'], dense['embed'])
  np.testing.assert_array_equal(moe['blocks'][1]['attn']['wq'],
                                dense['blocks'][1]['attn']['wq'])
  # Laid out by the MoE's own shardings (experts over `expert`).
  have = state.params['blocks'][1]['ffn']['w_gate'].get_value().sharding
  want = s.state_shardings.params['blocks'][1]['ffn']['w_gate'].get_value()
  assert have.spec == want.spec == jax.sharding.PartitionSpec('expert', None, 'model')


def test_bad_sources_are_refused(dense_run, data_dir, tmp_path):
  _, dense_dir = dense_run
  missing = str(tmp_path / 'nope')
  def preflight_check(c):
    preflight.check(run_config.build(c), str(tmp_path / 'run'), writes=False)
  with pytest.raises(ConfigError, match='nope.*not a directory'):
    preflight_check(_moe_config(data_dir, missing))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ConfigError, match='empty.*no checkpoints'):
    preflight_check(_moe_config(data_dir, str(empty)))
  with pytest.raises(ConfigError, match='expert_dim=32 must equal.*mlp_dim=64'):
    preflight_check(_moe_config(data_dir, dense_dir, expert_dim=32))
  with pytest.raises(ConfigError, match='num_shared_experts'):
    preflight_check(_moe_config(data_dir, dense_dir, num_shared_experts=1))
  c = _tiny(dense_recipe.get_config('cpu'), data_dir, steps=1)
  c.init_from = dense_dir
  with pytest.raises(ConfigError, match='config is dense'):
    preflight_check(c)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    preflight_check(_moe_config(data_dir, dense_dir))   # the good one
