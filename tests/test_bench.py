"""scripts/bench.py end to end on a small config: every figure the issue asks
for is written, and the MFU and FLOP-ratio figures are the configs' own
active FLOPs over the step times the script measured."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import switch  # noqa: E402
from moe import data, dispatch, run_config  # noqa: E402

# MoE in one layer of two, so the share below counts MoE layers, not layers.
SMALL = {'model.num_layers': 2, 'model.moe_every': 2, 'batch_size': 4, 'seq_len': 64,
         'model.max_seq_len': 64}


def test_bench_writes_every_figure_from_the_configs_flops(tmp_path, data_dir):
  out = tmp_path / 'bench.json'
  subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'bench.py'), '--steps=1',
       '--rounds=1', '--layer_calls=1', '--loader_batches=5', f'--out={out}',
       f'--config.data.data_dir={data_dir}', *(f'--config.{k}={v}' for k, v in SMALL.items())],
      check=True, cwd=tmp_path, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, timeout=600)
  r = json.loads(out.read_text())
  assert set(r['layer_overhead']) == set(dispatch.DISPATCHES)   # keyed by dispatch path
  assert all(v > 0 and math.isfinite(v) for v in r['layer_overhead'].values())
  layer = r['layer_seconds']
  assert set(layer) == {*dispatch.DISPATCHES, 'experts_only', 'experts_only_e64', 'dense_active'}
  assert math.isclose(r['expert_ffn_floor'], layer['experts_only'] / layer['dense_active'])
  for key in ('expert_scaling_64_over_8', 'time_to_first_step_s', 'peak_memory_mb',
              'matmul_peak_gflops'):
    assert r[key] > 0 and math.isfinite(r[key]), key

  c = switch.get_config('cpu')
  c.model.num_layers, c.batch_size, c.seq_len, c.model.max_seq_len = 2, 4, 64, 64
  c.model.moe_every = 2
  moe = run_config.build(c).model
  flops = {'moe': moe.flops_per_token(64),
           'dense_total': moe.dense_twin_total().flops_per_token(64)}
  assert math.isclose(r['analytic_flop_ratio'], flops['dense_total'] / flops['moe'])
  step = r['step_seconds']
  assert set(step) == {'moe', 'dense_total', 'dense_active', 'e64'}   # 'moe' has 8 experts
  assert math.isclose(r['throughput_ratio_vs_dense_total'], step['dense_total'] / step['moe'])
  # The one MoE layer's expert FFN at 64 experts minus at 8, over the step gap.
  if step['e64'] > step['moe']:
    assert math.isclose(r['expert_ffn_share_of_64_over_8'],
                        (layer['experts_only_e64'] - layer['experts_only'])
                        / (step['e64'] - step['moe']))
  else:
    assert r['expert_ffn_share_of_64_over_8'] is None
  # The loader against what the step consumes: rows/s over batch / step time.
  loader = r['loader']
  assert loader['row_shuffle'] == 'global' and loader['rows_per_sec'] > 0
  assert math.isclose(loader['consumed_rows_per_sec'], 4 / step['moe'])
  assert math.isclose(loader['over_consumption'],
                      loader['rows_per_sec'] / loader['consumed_rows_per_sec'])
  assert math.isclose(loader['fetch_share_of_step'], 1 / loader['over_consumption'])
  # The recipe's evaluations (600 steps, every 100 on 12 batches, then the
  # whole split) against its training: batches x eval batch / train time.
  ev = r['evaluation']
  rows = data.split_stats(data.DataConfig(data_dir=data_dir), 'validation')['tokens'] // 65
  assert ev['eval_batches_per_run'] == 6 * 12 + -(-rows // 4)
  assert ev['eval_batch_s'] > 0
  assert math.isclose(ev['share_of_training'],
                      ev['eval_batches_per_run'] * ev['eval_batch_s'] / (600 * step['moe']))
  # Adaptive compute: cheap experts and threshold routing get the buffers of
  # top-1 (capacity for 1.0 FFN expert: 1.25 x 256 / 8 = 40), top-2 twice.
  ad = r['adaptive']
  assert ad['capacity'] == {'top1': 40, 'top2': 80, 'cheap': 40, 'top_p': 40}
  assert ad['ffn_experts_per_token_at_init']['top1'] == 1.0
  assert ad['ffn_experts_per_token_at_init']['top2'] == 2.0
  assert 0 <= ad['ffn_experts_per_token_at_init']['cheap'] <= 2
  assert 1 <= ad['ffn_experts_per_token_at_init']['top_p'] <= 2
  for name, t in ad['step_seconds'].items():
    assert math.isclose(ad['over_top2'][name], t / ad['step_seconds']['top2'])
    assert math.isclose(ad['over_top1'][name], t / ad['step_seconds']['top1'])
  # MFU counts active FLOPs only: FLOPs/token x tokens / step time / peak.
  for name, key in (('moe', 'mfu_moe'), ('dense_total', 'mfu_dense')):
    assert math.isclose(r[key], flops[name] * 4 * 64 / step[name]
                        / (r['matmul_peak_gflops'] * 1e9), rel_tol=1e-6), key
