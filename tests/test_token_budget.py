"""scripts/token_budget.py end to end on a tiny config: two budgets, two
seeds, the MoE and its dense-active twin on the same batches, the table's
differences and their intervals over seeds from the runs' own final
losses, the plot, and bad input."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe import intervals, report  # noqa: E402
from moe.checkpoint import checkpoint_steps  # noqa: E402
from tiny import SWITCH_OVERRIDES  # noqa: E402

TINY = {**SWITCH_OVERRIDES, 'eval_batches': 1, 'final_eval_batches': 2}


def _run(workdir, data_dir, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  overrides = [f'--config.{k}={v}' for k, v in {**TINY, 'data.data_dir': data_dir}.items()]
  return subprocess.run(
      [sys.executable, 'scripts/token_budget.py', '--config', 'configs/switch.py:cpu',
       '--workdir', workdir, *overrides, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_budgets_table_and_plot(tmp_path, data_dir):
  workdir = str(tmp_path / 'budget')
  proc = _run(workdir, data_dir, '--steps', '2,4', '--seeds', '0,1')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  text = open(os.path.join(workdir, 'budget.md')).read()
  for steps in (2, 4):
    tokens, diffs = steps * 8 * 32, []
    for seed in (0, 1):
      finals, crcs = {}, {}
      for arm in ('moe', 'dense_active'):
        path = os.path.join(workdir, f'steps_{steps}', f'seed_{seed}', arm, 'metrics.jsonl')
        _, train, evals, final = report.read_metrics(path)
        assert final['step'] == steps and sorted(train) == list(range(1, steps + 1))
        finals[arm] = final['loss']
        crcs[arm] = [train[s]['data_crc'] for s in sorted(train)]
      assert crcs['moe'] == crcs['dense_active']           # the same batches
      # A checkpoint at every eval (every step here; max_to_keep 3), so a
      # long budget stopped part way resumes.
      assert checkpoint_steps(os.path.dirname(path)) == list(range(max(steps - 2, 1), steps + 1))
      diffs.append(finals['moe'] - finals['dense_active'])
      assert (f"| {steps} | {tokens:,} | {seed} | {finals['moe']:.4f} | "
              f"{finals['dense_active']:.4f} | {diffs[-1]:+.4f} |" in text), text
    iv = intervals.mean_interval(diffs)
    assert iv.kind == 'seeds' and iv.low < iv.mean < iv.high
    assert (f'| {steps} | {tokens:,} | 2 | {iv.mean:+.4f} | [{iv.low:+.4f}, {iv.high:+.4f}] | '
            f'{intervals.verdict(iv)} |' in text), text
  assert os.path.getsize(os.path.join(workdir, 'budget_gap.png')) > 10_000
  # A re-run trains nothing again.
  again = _run(workdir, data_dir, '--steps', '2,4', '--seeds', '0,1')
  assert again.returncode == 0
  assert len(re.findall(r'finished \((2|4) steps\), skipping', again.stdout)) == 8


def test_bad_budget_is_one_line(tmp_path, data_dir):
  proc = _run(str(tmp_path / 'b'), data_dir, '--steps', '600,x')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'FATAL ConfigError: --steps=600,x must be a comma-separated list of '
      'integers >= 1.')
  assert not os.path.exists(tmp_path / 'b')
