"""The main job end to end: scripts/compare.py on a tiny config trains the MoE
and its two dense twins on the same batches, for two seeds, and writes the
report with its intervals (over seeds; with one seed, over documents)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import switch  # noqa: E402
from moe import intervals, report, run_config  # noqa: E402
from moe.model import Transformer  # noqa: E402
from tiny import SWITCH_OVERRIDES, read_jsonl  # noqa: E402

TINY = {**SWITCH_OVERRIDES, 'num_steps': 4, 'eval_every': 2, 'checkpoint_every': 4,
        'eval_batches': 1, 'final_eval_batches': 12}


def _overrides(data_dir):
  return [f'--config.{k}={v}' for k, v in {**TINY, 'data.data_dir': data_dir}.items()]


def _config(data_dir):
  c = switch.get_config('cpu')
  c.update_from_flattened_dict({**TINY, 'data.data_dir': data_dir})
  return c


def _run(workdir, data_dir, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  return subprocess.run(
      [sys.executable, 'scripts/compare.py', '--config', 'configs/switch.py:cpu',
       '--workdir', workdir, '--seeds', '2', *_overrides(data_dir), *extra],
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
  # What seed 0's experts took: the routes analysis of its final checkpoint.
  routes = os.path.join(workdir, 'seed_0', 'moe', 'routes')
  with open(os.path.join(routes, 'routes.json')) as f:
    assert json.load(f)['step'] == TINY['num_steps']
  for picture in ('heatmap.png', 'code.png'):
    assert os.path.getsize(os.path.join(routes, picture)) > 10_000
    assert f'(seed_0/moe/routes/{picture})' in text
  assert '## What the experts learned' in text


def test_three_runs_saw_identical_batches(compared):
  """Arms share seed i's batches; seeds differ."""
  workdir, _, _ = compared
  crcs = {}
  for seed in (0, 1):
    for name in report.RUNS:
      _, train, evals, final = report.read_metrics(
          os.path.join(workdir, f'seed_{seed}', name, 'metrics.jsonl'))
      assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
      assert final['step'] == 4 and final['tokens'] == 12 * evals[4]['tokens']
      crcs[seed, name] = [train[s]['data_crc'] for s in sorted(train)]
    assert len(set(crcs[seed, 'moe'])) == 4           # a new batch every step
    assert crcs[seed, 'moe'] == crcs[seed, 'dense_total'] == crcs[seed, 'dense_active']
  assert crcs[0, 'moe'][0] != crcs[1, 'moe'][0]


def _per_seed_final(workdir, seed, name):
  return report.read_metrics(
      os.path.join(workdir, f'seed_{seed}', name, 'metrics.jsonl'))[3]['loss']


def test_report_intervals_over_seeds(compared):
  """Two seeds: the paired differences' mean and t-interval, recomputed
  here from the runs' own final losses, and one sentence per twin."""
  workdir, _, _ = compared
  text = open(os.path.join(workdir, 'report.md')).read()
  for twin in ('dense_active', 'dense_total'):
    d = [_per_seed_final(workdir, s, 'moe') - _per_seed_final(workdir, s, twin)
         for s in (0, 1)]
    mean, half = sum(d) / 2, 12.7062 * abs(d[0] - d[1]) / 2   # t(0.975, 1)*sd/sqrt(2)
    row = next(l for l in text.splitlines()
               if l.startswith(f'| vs. {report.LABELS[twin]} |'))
    cells = [c.strip() for c in row.split('|')[1:-1]]
    assert cells[1] == f'{d[0]:+.4f}, {d[1]:+.4f}'
    assert cells[2] == f'{mean:+.4f}'
    assert cells[3] == f'[{mean - half:+.4f}, {mean + half:+.4f}]'
    assert cells[4] == '2 seeds'
    assert f'Against the {report.LABELS[twin]} twin: ' in text
  assert text.count('Against the ') == 2


def test_one_seed_report_bootstraps_over_documents(compared, tmp_path):
  workdir, _, _ = compared
  one = str(tmp_path / 'one')
  shutil.copytree(os.path.join(workdir, 'seed_0'), os.path.join(one, 'seed_0'))
  report.write_report(one)
  text = open(os.path.join(one, 'report.md')).read()
  docs = json.load(open(os.path.join(one, 'seed_0', 'moe', 'final_eval_documents.json')))
  twin = json.load(open(os.path.join(one, 'seed_0', 'dense_active',
                                     'final_eval_documents.json')))
  n = sum(t > 0 for t in docs['tokens'])
  row = next(l for l in text.splitlines()
             if l.startswith(f"| vs. {report.LABELS['dense_active']} |"))
  assert f'{n} documents (bootstrap)' in row
  # The row's interval and verdict are the paired bootstrap of the two
  # runs' per-document losses, and the sentence says the same.
  d = intervals.paired_bootstrap(docs['loss_sum'], twin['loss_sum'], docs['tokens'])
  cells = [c.strip() for c in row.split('|')[1:-1]]
  assert cells[2:4] == [f'{d.mean:+.4f}', f'[{d.low:+.4f}, {d.high:+.4f}]']
  assert cells[5] == intervals.verdict(d)
  assert report.sentence('dense_active', d) in text
  # The per-document sums add up to the logged final loss.
  assert sum(docs['loss_sum']) / sum(docs['tokens']) == pytest.approx(
      _per_seed_final(workdir, 0, 'moe'), rel=1e-6)


def _built_params(cfg) -> int:
  model = nnx.eval_shape(lambda: Transformer(cfg, jax.random.key(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_table_parameter_counts_match_the_built_models(compared):
  workdir, data_dir, _ = compared
  runs = run_config.dense_twins(_config(data_dir))
  text = open(os.path.join(workdir, 'report.md')).read()
  moe_cfg = run_config.build(runs['moe']).model
  for name, config in runs.items():
    cfg = run_config.build(config).model
    row = next(l for l in text.splitlines() if l.startswith(f'| {report.LABELS[name]} |'))
    total, active = (int(x.replace(',', '')) for x in row.split('|')[2:4])
    assert total == _built_params(cfg) == cfg.num_params, name
    assert active == cfg.num_active_params, name
  # The twins are twins: total within 1%, active FLOPs within 1%.
  twin_total = run_config.build(runs['dense_total']).model
  twin_active = run_config.build(runs['dense_active']).model
  assert math.isclose(twin_total.num_params, moe_cfg.num_params, rel_tol=0.01)
  assert math.isclose(twin_active.flops_per_token(32), moe_cfg.flops_per_token(32),
                      rel_tol=0.01)


def test_rerun_skips_finished_runs_and_redraws(compared):
  workdir, data_dir, _ = compared
  os.remove(os.path.join(workdir, 'report.md'))
  routes_json = os.path.join(workdir, 'seed_0', 'moe', 'routes', 'routes.json')
  analysed_at = os.path.getmtime(routes_json)
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(re.findall(r'finished \(4 steps\), skipping', proc.stdout)) == 6
  assert os.path.exists(os.path.join(workdir, 'report.md'))          # redrawn
  assert os.path.getmtime(routes_json) == analysed_at   # not analysed again
  # Nothing was trained again: each run logged every step once.
  for name in report.RUNS:
    steps = [l['step'] for l in read_jsonl(os.path.join(workdir, 'seed_0', name))
             if 'loss' in l]
    assert steps == [1, 2, 3, 4], name
