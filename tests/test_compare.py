"""The main job end to end: scripts/compare.py on a tiny config trains the MoE
and its two dense twins on the same batches and writes the report."""

import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import switch  # noqa: E402
from moe import report, run_config  # noqa: E402
from moe.model import Transformer  # noqa: E402
from tiny import read_jsonl  # noqa: E402

TINY = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2,
    'model.head_dim': 16, 'model.max_seq_len': 32, 'seq_len': 32,
    'moe.expert_dim': 32, 'moe.group_size': 64, 'batch_size': 8,
    'num_steps': 4, 'log_every': 1, 'eval_every': 2, 'checkpoint_every': 4,
    'eval_batches': 1, 'peak_flops_per_device': 1e12, 'progress_bar': False,
}


def _overrides(data_dir):
  return [f'--config.{k}={v}' for k, v in {**TINY, 'data.data_dir': data_dir}.items()]


def _config(data_dir):
  c = switch.get_config('cpu')
  c.update_from_flattened_dict({**TINY, 'data.data_dir': data_dir})
  return c


def _run(workdir, data_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  return subprocess.run(
      [sys.executable, 'scripts/compare.py', '--config', 'configs/switch.py:cpu',
       '--workdir', workdir, *_overrides(data_dir)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def compared(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('compare'))
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir, data_dir, proc


def test_report_and_every_plot_are_written(compared):
  workdir, _, proc = compared
  text = open(os.path.join(workdir, 'report.md')).read()
  for plot in report.PLOTS:
    path = os.path.join(workdir, plot)
    assert os.path.getsize(path) > 10_000, plot        # a real PNG, not empty
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert f'({plot})' in text
  for label in report.LABELS.values():
    assert label in text
  assert 'report: ' in proc.stdout


def test_three_runs_saw_identical_batches(compared):
  workdir, _, _ = compared
  crcs = {}
  for name in report.RUNS:
    _, train, evals = report.read_metrics(os.path.join(workdir, name, 'metrics.jsonl'))
    assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    crcs[name] = [train[s]['data_crc'] for s in sorted(train)]
  assert len(set(crcs['moe'])) == 4                    # a new batch every step
  assert crcs['moe'] == crcs['dense_total'] == crcs['dense_active']


def _built_params(cfg) -> int:
  model = nnx.eval_shape(lambda: Transformer(cfg, jax.random.key(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_table_parameter_counts_match_the_built_models(compared):
  workdir, data_dir, _ = compared
  runs = run_config.dense_twins(_config(data_dir))
  text = open(os.path.join(workdir, 'report.md')).read()
  moe_cfg = run_config.model_config(runs['moe'])
  for name, config in runs.items():
    cfg = run_config.model_config(config)
    row = next(l for l in text.splitlines() if l.startswith(f'| {report.LABELS[name]} |'))
    total, active = (int(x.replace(',', '')) for x in row.split('|')[2:4])
    assert total == _built_params(cfg) == cfg.num_params, name
    assert active == cfg.num_active_params, name
  # The twins are twins: total within 1%, active FLOPs within 1%.
  twin_total = run_config.model_config(runs['dense_total'])
  twin_active = run_config.model_config(runs['dense_active'])
  assert math.isclose(twin_total.num_params, moe_cfg.num_params, rel_tol=0.01)
  assert math.isclose(twin_active.flops_per_token(32), moe_cfg.flops_per_token(32),
                      rel_tol=0.01)


def test_rerun_skips_finished_runs_and_redraws(compared):
  workdir, data_dir, _ = compared
  os.remove(os.path.join(workdir, 'report.md'))
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(re.findall(r'finished \(4 steps\), skipping', proc.stdout)) == 3
  assert os.path.exists(os.path.join(workdir, 'report.md'))          # redrawn
  # Nothing was trained again: each run logged every step once.
  for name in report.RUNS:
    steps = [l['step'] for l in read_jsonl(os.path.join(workdir, name)) if 'loss' in l]
    assert steps == [1, 2, 3, 4], name
