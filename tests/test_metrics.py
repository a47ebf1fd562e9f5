"""Metric writers, expert statistics, throughput/MFU and the NaN safety rail."""

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe import metrics as M
from moe.config import MoeConfig
from moe.routing import RouterStats, route


def hand_stats():
  """2 MoE layers, 4 experts: layer 0 uses 2 experts, layer 1 is balanced."""
  return RouterStats(
      aux_loss=np.array([1.0, 1.5], np.float32),
      z_loss=np.array([2.0, 4.0], np.float32),
      expert_load=np.array([[0.5, 0.5, 0.0, 0.0],
                            [0.25, 0.25, 0.25, 0.25]], np.float32),
      dropped_fraction=np.array([0.1, 0.3], np.float32),
      router_entropy=np.array([1.0, 1.2], np.float32),
      ffn_per_token=np.array([0.5, 1.25], np.float32),
      ffn_count_share=np.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], np.float32),
      cheap_share=np.array([[0.4, 0.1], [0.2, 0.0]], np.float32),
      compute_loss=np.array([0.25, 0.0625], np.float32))


def real_stats(num_layers=3, num_experts=8):
  """RouterStats from the real router, stacked over layers like the model's."""
  cfg = MoeConfig(num_experts=num_experts, top_k=2)
  per_layer = []
  for layer in range(num_layers):
    logits = jax.random.normal(jax.random.key(layer), (2, 16, num_experts)) * 3
    per_layer.append(route(logits, cfg, capacity=4)[1])
  return jax.tree.map(lambda *x: np.asarray(jnp.stack(x)), *per_layer)


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def read_tb(workdir):
  """{tag: [(step, value)]} read back with TensorBoard's own reader."""
  files = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  assert files
  out = {}
  for path in files:
    acc = EventAccumulator(path, size_guidance={'scalars': 0, 'tensors': 0})
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
  return out


def test_router_summary_hand_made():
  s = M.router_summary(hand_stats())
  assert s['expert_load'] == [[0.5, 0.5, 0.0, 0.0], [0.25] * 4]
  assert s['per_layer/load_max_over_mean'] == [2.0, 1.0]
  assert s['load_max_over_mean'] == 1.5
  assert s['per_layer/dead_experts'] == [2, 0]
  assert s['dead_experts'] == 2 and isinstance(s['dead_experts'], int)
  assert s['dropped_fraction'] == pytest.approx(0.2)
  assert s['per_layer/dropped_fraction'] == pytest.approx([0.1, 0.3])
  assert s['router_entropy'] == pytest.approx(1.1)
  assert s['per_layer/aux_loss'] == [1.0, 1.5]
  assert s['per_layer/z_loss'] == [2.0, 4.0]
  assert s['per_layer/compute_loss'] == [0.25, 0.0625]
  assert s['ffn_experts_per_token'] == 0.875
  assert s['per_layer/ffn_experts_per_token'] == [0.5, 1.25]
  assert s['ffn_count_share'] == [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
  np.testing.assert_allclose(s['cheap_share'], [[0.4, 0.1], [0.2, 0.0]], rtol=1e-6)
  json.dumps(s, allow_nan=False)   # JSON-able as is
  # One unstacked layer is accepted as L = 1.
  one = M.router_summary(jax.tree.map(lambda x: x[0], hand_stats()))
  assert one['expert_load'] == [[0.5, 0.5, 0.0, 0.0]] and one['dead_experts'] == 2


def test_tensorboard_scalar_names():
  tags = M.tensorboard_scalars({'loss': 2.0, 'router': hand_stats()})
  assert tags['loss'] == 2.0
  assert tags['expert_load/layer_0/expert_1'] == 0.5
  assert tags['expert_load/layer_1/expert_3'] == 0.25
  assert tags['ffn_count_share/layer_1/experts_2'] == 0.5
  assert tags['cheap_share/layer_0/cheap_1'] == pytest.approx(0.1)
  assert tags['ffn_experts_per_token/layer_1'] == 1.25
  assert tags['dropped_fraction/layer_1'] == pytest.approx(0.3)
  assert tags['dead_experts/layer_0'] == 2.0
  assert tags['load_max_over_mean'] == 1.5
  assert 'per_layer/dropped_fraction' not in tags and 'router' not in tags
  # loss, 5 means, 2x4 loads, 8 per-layer x 2, 2x3 count shares, 2x2 cheap shares
  assert len(tags) == 1 + 5 + 8 + 2 * 8 + 6 + 4


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  workdir = str(tmp_path)
  stats = real_stats()
  with M.MetricWriter(workdir, enabled=True, total_steps=10, progress=False) as w:
    w.write(0, {'mfu_peak_source': 'declared', 'num_devices': 8})
    for step in (1, 2):
      w.write(step, {'loss': jnp.float32(3.0 / step), 'grad_norm': np.float32(0.5),
                     'lr': 1e-3 * step, 'router': stats,
                     'tokens_per_sec': 1000.0 * step, 'mfu': 0.25})
    w.write_eval(2, {'loss': 2.5, 'router': hand_stats()})

  lines = read_jsonl(workdir)
  assert [l['step'] for l in lines] == [0, 1, 2, 2]
  assert lines[0] == {'step': 0, 'mfu_peak_source': 'declared', 'num_devices': 8}
  train = lines[2]
  assert train['loss'] == 1.5 and train['lr'] == 2e-3 and train['grad_norm'] == 0.5
  assert 'router' not in train
  load = np.array(train['expert_load'])
  assert load.shape == (3, 8)                                # [L, E]
  np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-6)    # fraction per layer
  np.testing.assert_allclose(load, stats.expert_load, rtol=1e-6)
  assert train['dropped_fraction'] == pytest.approx(float(stats.dropped_fraction.mean()))
  assert len(train['per_layer/router_entropy']) == 3
  expected = (load.max(1) / load.mean(1))
  assert train['per_layer/load_max_over_mean'] == pytest.approx(expected.tolist())
  assert train['dead_experts'] == int((load == 0).sum())
  evl = lines[3]
  assert evl['eval/loss'] == 2.5 and evl['eval/dead_experts'] == 2
  assert evl['eval/per_layer/dead_experts'] == [2, 0]
  assert not any(k.startswith('eval/') for k in train)

  tb = read_tb(workdir)
  assert tb['loss'] == [(1, 3.0), (2, 1.5)]
  assert tb['tokens_per_sec'] == [(1, 1000.0), (2, 2000.0)]
  assert tb['num_devices'] == [(0, 8.0)]
  for l in range(3):
    assert tb[f'dropped_fraction/layer_{l}'][-1] == (
        2, pytest.approx(float(stats.dropped_fraction[l]), rel=1e-6))
    for e in range(8):
      assert tb[f'expert_load/layer_{l}/expert_{e}'][-1] == (
          2, pytest.approx(load[l, e], rel=1e-6, abs=1e-7))
  assert tb['load_max_over_mean'][-1] == (2, pytest.approx(expected.mean(), rel=1e-6))
  assert tb['eval/loss'] == [(2, 2.5)]
  assert tb['eval/dead_experts/layer_0'] == [(2, 2.0)]
  assert tb['eval/expert_load/layer_0/expert_2'] == [(2, 0.0)]


def test_append_after_reopen_keeps_earlier_lines(tmp_path):
  workdir = str(tmp_path)
  with M.MetricWriter(workdir, enabled=True, total_steps=4, progress=False) as w:
    w.write(1, {'loss': 4.0})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 2, "lo')                 # a crash mid-line
  with M.MetricWriter(workdir, enabled=True, total_steps=4, progress=False) as w:
    w.write(2, {'loss': 3.0})
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    raw = f.read().splitlines()
  assert len(raw) == 3
  assert json.loads(raw[0]) == {'step': 1, 'loss': 4.0}
  assert json.loads(raw[2]) == {'step': 2, 'loss': 3.0}


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  w = M.MetricWriter(workdir, enabled=False, total_steps=3)
  w.write(1, {'loss': 1.0})
  w.write_eval(1, {'loss': 1.0})
  w.close()
  assert not os.path.exists(workdir)


def test_nonfinite_metrics_are_logged(tmp_path):
  workdir = str(tmp_path)
  bad = {'loss': jnp.float32(jnp.nan), 'grad_norm': np.inf, 'lr': 1e-3,
         'router': hand_stats()._replace(z_loss=np.array([1.0, -np.inf]))}
  with M.MetricWriter(workdir, enabled=True, total_steps=3, progress=False) as w:
    w.write(1, bad)                                                 # no crash
  (line,) = read_jsonl(workdir)
  assert line['loss'] == 'nan' and line['grad_norm'] == 'inf'
  assert line['per_layer/z_loss'] == [1.0, '-inf']
  tb = read_tb(workdir)
  assert math.isnan(tb['loss'][0][1]) and tb['z_loss/layer_1'][0][1] == -math.inf


def test_throughput_math_with_fake_clock():
  now = [100.0]
  tp = M.Throughput(flops_per_token=6e9, tokens_per_step=4096,
                    peak_flops_per_device=1e15, peak_source='declared',
                    num_devices=8, clock=lambda: now[0])
  assert tp.measure(10) == {}                 # first call only starts
  now[0] += 2.0
  out = tp.measure(20)                        # 10 steps in 2 s
  assert out['step_time'] == 0.2
  assert out['tokens_per_sec'] == 10 * 4096 / 2.0
  assert out['tflops_per_sec'] == pytest.approx(20480 * 6e9 / 1e12)
  assert out['mfu'] == pytest.approx(20480 * 6e9 / 8e15)
  now[0] += 100.0                             # eval time, excluded by start()
  tp.start(20)
  now[0] += 0.5
  out = tp.measure(25)
  assert out['step_time'] == 0.1 and out['tokens_per_sec'] == 5 * 4096 / 0.5
  assert tp.measure(25) == {}                 # no step taken
  # Adaptive compute: every step counted -> their mean FLOPs per token.
  for f in (3e9, 5e9):
    tp.count(f)
  now[0] += 1.0
  out = tp.measure(27)
  assert out['flops_per_token'] == 4e9
  assert out['tflops_per_sec'] == pytest.approx(2 * 4096 / 1.0 * 4e9 / 1e12)
  tp.count(1e9)                               # 1 of 2 steps counted: nominal
  now[0] += 1.0
  out = tp.measure(29)
  assert 'flops_per_token' not in out
  assert out['tflops_per_sec'] == pytest.approx(2 * 4096 * 6e9 / 1e12)
  assert tp.info() == {'mfu_peak_source': 'declared', 'peak_tflops_per_device': 1000.0,
                       'num_devices': 8, 'flops_per_token': 6e9}
  with pytest.raises(ValueError, match='peak_source'):
    M.Throughput(flops_per_token=1, tokens_per_step=1, peak_flops_per_device=1,
                 peak_source='guessed')


def test_measure_matmul_peak():
  # The arithmetic, with a clock whose three timings are 0.6, 0.1 and 0.2 s:
  # 2 n^3 FLOPs per matmul, `calls` matmuls per timing, the median timing.
  # (Mutations: n^3 FLOPs, the mean or the fastest timing: off by >= 1.5x.)
  ticks = iter([0.0, 0.6, 1.0, 1.1, 2.0, 2.2])
  peak = M.measure_matmul_peak(jnp.float32, n=64, repeats=3, calls=2,
                               clock=lambda: next(ticks))
  assert peak == pytest.approx(2 * 64**3 * 2 / 0.2, rel=1e-12)
  # On the real clock: finite and positive (its value is this machine's).
  peak = M.measure_matmul_peak(jnp.float32, n=256, repeats=3, calls=2)
  assert math.isfinite(peak) and peak > 0
  assert M.peak_flops(989e12) == (989e12, 'declared')
  # CPU "devices" share the host cores, so MFU counts the process, not 8 devices.
  tp = M.Throughput(flops_per_token=1.0, tokens_per_step=1,
                    peak_flops_per_device=peak, peak_source='measured')
  assert tp.num_devices == jax.process_count() == 1
