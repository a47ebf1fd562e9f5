"""Expert parallelism: every mesh equals one device; experts really split."""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharded_setup
from moe import sharding
from moe.config import DISPATCHES, ConfigError, ModelConfig, MoeConfig

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def _to_np(tree):
  return jax.tree.map(np.asarray, tree)


@functools.cache
def _grads(mesh_shape, dispatch, balance_scope='group', fsdp=False):
  """(loss, grads, compiled HLO text, Trainer, state) of one train step."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  s, state = sharded_setup.build(mesh_shape, dispatch, devices, balance_scope, fsdp)
  tokens = jax.device_put(sharded_setup.batches(1)[0], s.batch_sharding)
  compiled = sharded_setup.loss_and_grads(s).lower(state, tokens).compile()   # once: run and read
  loss, metrics, grads = compiled(state, tokens)
  hlo = compiled.as_text()
  dropped = float(metrics['router'].dropped_fraction.mean())
  assert dropped == 0 if dispatch == 'dropless' else dropped > 0  # tight capacity
  return float(loss), _to_np(grads), hlo, s, state


# Every mesh for the gather path (the default, with its own all-to-all);
# the dropless path (its own all-to-all as well) on the expert-only and the
# three-axis mesh; the one-hot einsum path, whose all-to-all the compiler
# inserts from the same sharding constraints, on the data x expert and the
# three-axis mesh.
MESH_CASES = ([(m, 'gather') for m in MESHES[1:]]
              + [((1, 8, 1), 'dropless'), ((2, 2, 2), 'dropless')]
              + [((2, 4, 1), 'einsum'), ((2, 2, 2), 'einsum')])
assert {d for _, d in MESH_CASES} == set(DISPATCHES)


@pytest.mark.parametrize('mesh_shape,dispatch', MESH_CASES,
                         ids=[f'{"x".join(map(str, m))}-{d}' for m, d in MESH_CASES])
def test_mesh_equals_single_device(mesh_shape, dispatch):
  loss, grads, *_ = _grads(mesh_shape, dispatch)
  ref_loss, ref_grads, *_ = _grads((1, 1, 1), dispatch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)


def test_batch_balance_scope_on_a_mesh_equals_single_device():
  """The batch-wide f_e and P_e reduce across data and expert shards: the
  sharded loss and gradients equal one device's, and differ from the
  per-group loss (16 groups of 8 tokens here)."""
  loss, grads, *_ = _grads((2, 4, 1), 'gather', 'batch')
  ref_loss, ref_grads, *_ = _grads((1, 1, 1), 'gather', 'batch')
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
  assert abs(loss - _grads((1, 1, 1), 'gather')[0]) > 1e-4


def test_fsdp_equals_single_device():
  """fsdp=True also splits the weights' d_model over `data` (ZeRO-3 style):
  the step is one device's, and the weights really are split."""
  loss, grads, _, s, _ = _grads((2, 4, 1), 'gather', fsdp=True)
  ref_loss, ref_grads, *_ = _grads((1, 1, 1), 'gather')
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
  params = s.state_shardings.params
  assert params['embed'].spec == jax.sharding.PartitionSpec('model', 'data')
  assert 'data' in params['blocks'][0]['ffn']['w_gate'].spec   # [E, D, F]: D over data


def test_capacity_paths_agree_on_one_device():
  loss_e, grads_e, *_ = _grads((1, 1, 1), 'einsum')
  loss_g, grads_g, *_ = _grads((1, 1, 1), 'gather')
  np.testing.assert_allclose(loss_e, loss_g, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_e, grads_g)


def test_dropless_equals_capacity_paths_when_nothing_drops():
  """With capacity for every token (cf = E/k), all three paths give the same
  loss: dropless is the capacity paths' no-drop limit."""
  import dataclasses
  losses = {}
  for dispatch in DISPATCHES:
    cfg = sharded_setup.model_config(dispatch)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, train_capacity_factor=cfg.moe.num_experts / cfg.moe.top_k))
    s = sharded_setup.trainer(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state = s.init(jax.random.key(0))
    loss, metrics, _ = sharded_setup.loss_and_grads(s)(state, sharded_setup.batches(1)[0])
    assert float(metrics['router'].dropped_fraction.mean()) == 0
    losses[dispatch] = float(loss)
  np.testing.assert_allclose(losses['einsum'], losses['dropless'], rtol=1e-5)
  np.testing.assert_allclose(losses['gather'], losses['dropless'], rtol=1e-5)


def _all_to_alls(hlo: str) -> int:
  return len(re.findall(r'\ball-to-all(?:-start)?\(', hlo))


ALL_REDUCE = r'\ball-reduce(?:-start)?\('


@pytest.mark.parametrize('dispatch', DISPATCHES)
def test_expert_axis_compiles_to_all_to_all(dispatch):
  for mesh_shape in [(1, 1, 1)] + [m for m, d in MESH_CASES if d == dispatch]:
    hlo = _grads(mesh_shape, dispatch)[2]
    if mesh_shape[1] > 1:
      assert _all_to_alls(hlo) >= 2, (mesh_shape, dispatch)
    if mesh_shape[0] > 1:    # data parallel: the gradients are all-reduced
      assert re.search(ALL_REDUCE, hlo), (mesh_shape, dispatch)
    if mesh_shape == (1, 1, 1):
      # No collectives at all on one device: the explicit all-to-all paths
      # are skipped (a shard_map over size-1 axes left an all-reduce of
      # every expert weight gradient, 8 ms a step at 64 experts).
      assert _all_to_alls(hlo) == 0
      assert not re.search(ALL_REDUCE, hlo), dispatch


@pytest.mark.parametrize('mesh_shape', [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_expert_weights_split_over_expert_and_model(mesh_shape):
  *_, state = _grads(mesh_shape, 'gather')
  _, expert, model = mesh_shape
  for block in state.params['blocks'].values():
    for name in ('w_gate', 'w_up', 'w_down'):
      w = block['ffn'][name][...]
      held = sharded_setup.bytes_per_device(w)
      assert held * expert * model == w.nbytes, (name, held, w.nbytes)


def test_replicated_large_parameter_is_refused():
  _, _, _, s, state = _grads((1, 8, 1), 'gather')
  sharding.check_sharded(state.params, s.state_shardings.params, min_size=1)
  w = state.params['blocks'][0]['ffn']['w_gate']
  replicated = jax.device_put(w[...], jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec()))
  bad = jax.tree.map(lambda x: x, state.params)
  bad['blocks'][0]['ffn']['w_gate'] = w.replace(replicated)
  with pytest.raises(RuntimeError, match='replicated by mistake'):
    sharding.check_sharded(bad, s.state_shardings.params, min_size=1)


def _cfg(**moe):
  return ModelConfig(vocab_size=128, d_model=16, num_layers=2, num_heads=4,
                     head_dim=4, mlp_dim=32, max_seq_len=8,
                     moe=MoeConfig(**{'num_experts': 8, 'expert_dim': 16,
                                      'group_size': 8, **moe}))


@pytest.mark.parametrize('cfg,mesh_shape,batch,message', [
    (_cfg(num_experts=6), (1, 4, 2), 16, r'moe.num_experts=6 is not divisible by the expert axis \(4\)'),
    (_cfg(), (2, 4, 1), 12, r'batch_size=12 is not divisible by data x expert = 2 x 4 = 8'),
    (_cfg(group_size=32), (2, 4, 1), 16, r'4 routing groups .* not divisible by data x expert = 8'),
    (_cfg(expert_dim=15), (1, 4, 2), 16, r'moe.expert_dim=15 is not divisible by the model axis \(2\)'),
    (ModelConfig(256, num_heads=3, head_dim=8, max_seq_len=8), (4, 1, 2), 16,
     r'model.num_heads=3 is not divisible by the model axis \(2\)'),
])
def test_invalid_layout_refused_before_compilation(cfg, mesh_shape, batch, message):
  with pytest.raises(ConfigError, match=message):
    sharding.validate_layout(cfg, mesh_shape, global_batch=batch, seq_len=8)


@pytest.mark.parametrize('shape,message', [
    ((4, 4, 1), r'needs 16 devices but 8 exist'),
    ((3, -1, 1), r'8 devices do not divide by 3'),
    ((2, -1, -1), r'at most one -1'),
])
def test_invalid_mesh_refused(shape, message):
  with pytest.raises(ConfigError, match=message):
    sharding.make_mesh(shape)


def test_mesh_rest_axis_and_explicit_axis_types():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {'data': 2, 'expert': 4, 'model': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_two_level_mesh(tmp_path):
  """2 real processes x 4 CPU devices under jax.distributed, each process a
  domain: data across them, experts inside (mesh (1, 4, 1) x dcn_mesh
  (2, 1, 1)). Every all-to-all of the compiled step stays inside a process,
  and the loss and gradients are those of 8 devices here. A flat (1, 8, 1)
  mesh, the expert axis across both processes, is built with a warning, and
  its all-to-alls cross processes."""
  port, out = _free_port(), tmp_path / 'result.json'
  here = os.path.dirname(__file__)
  env = {**os.environ, 'PYTHONPATH': here + os.pathsep + os.environ.get('PYTHONPATH', '')}
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', ''))   # each process: 4 devices
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(here, 'sharded_worker.py'),
       '--coordinator', f'127.0.0.1:{port}', '--num_processes', '2',
       '--process_id', str(i), '--out', str(out)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), '\n'.join(l[-3000:] for l in logs)
  got = json.loads(out.read_text())

  # The layout: every group of every all-to-all within one process; the
  # flat mesh's groups span both, and its building said so.
  assert got['hybrid_warnings'] == []
  assert len(got['hybrid_groups']) == 8          # 4 per MoE layer, 2 layers
  assert all(len(set(g)) == 1 for op in got['hybrid_groups'] for g in op)
  assert len(got['flat_groups']) == 8
  assert all(sorted(set(g)) == [0, 1] for op in got['flat_groups'] for g in op)
  (warning,) = got['flat_warnings']
  assert "mesh axis 'expert' (size 8) spans 2 domains" in warning

  # The numbers: those of the same mesh on this process's 8 devices, each
  # process having fed only its own rows.
  want_loss, want_grads, *_ = _grads((2, 4, 1), 'gather')
  np.testing.assert_allclose(got['loss'], want_loss, rtol=1e-5)
  grads = np.load(str(out) + '.grads.npz')
  want_grads = {jax.tree_util.keystr(k): g for k, g in
                jax.tree_util.tree_flatten_with_path(want_grads)[0]}
  assert sorted(grads.files) == sorted(want_grads)
  for k, g in want_grads.items():
    np.testing.assert_allclose(grads[k], g, rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_level_mesh_layout_and_refusals():
  """Domain i holds block i of the mesh; a layout that does not fit the
  devices is refused before anything is built."""
  devices = jax.devices()
  grid = sharding.hybrid_devices((1, 2, 1), (2, 2, 1),
                                 [devices[0:2], devices[2:4], devices[4:6], devices[6:8]])
  assert grid.shape == (2, 4, 1)
  np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(grid)[:, :, 0],
                                [[0, 1, 2, 3], [4, 5, 6, 7]])
  # One process is one domain: a dcn_mesh of two needs two processes.
  with pytest.raises(ConfigError, match=r'dcn_mesh asks for 2 domains, but the '
                     r'devices belong to 1 processes'):
    sharding.make_mesh((2, 4, 1), dcn_shape=(2, 1, 1))
  with pytest.raises(ConfigError, match=r'dcn_mesh \(0, 1, 1\) is not valid'):
    sharding.resolve_layout((1, 4, 1), (0, 1, 1), 8)
  with pytest.raises(ConfigError, match=r'dcn_mesh \(3, 1, 1\) makes 3 domains, '
                     r'but 8 devices do not divide'):
    sharding.resolve_layout((1, -1, 1), (3, 1, 1), 8)
  assert sharding.resolve_layout((1, -1, 1), (2, 1, 1), 8) == (2, 4, 1)
  assert sharding.spans_domains((2, 1, 1)) == []
  assert sharding.spans_domains((1, 2, 2)) == ['expert', 'model']
