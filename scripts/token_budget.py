"""Where the MoE wins: the MoE - dense-active-twin gap at several token budgets.

  python scripts/token_budget.py --config configs/switch.py:cpu \\
      --workdir runs/budget --steps 600,2400,9600 --seeds 0,1,2

For every budget (num_steps; the learning-rate schedule is stretched to it,
eval_every = num_steps / 4) and seed, trains the MoE of --config and its
matched-active-FLOPs dense twin (moe.run_config.dense_twins: same data order,
optimizer and schedule) in WORKDIR/steps_{N}/seed_{S}/{moe,dense_active},
checkpointed at every eval so that a run stopped part way resumes where it
was; then writes WORKDIR/budget.md (per budget: each seed's final validation
losses, the MoE - twin difference and its 95% interval over seeds) and
WORKDIR/budget_gap.png (the gap against training tokens, each seed's and
the mean with its 95% interval over seeds). Sparse models need
tokens to fill their parameters; this shows from which budget on the MoE
pays at this size, or that it does not. Re-running skips finished runs;
--report_only redraws.
"""

import os
import shlex
import sys

import matplotlib
from absl import flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from moe import config_flag, intervals, report, run_config, sweep  # noqa: E402
from moe.config import ConfigError  # noqa: E402

_CONFIG = config_flag.define(os.path.join(ROOT, 'configs', 'switch.py:cpu'),
                             'The MoE config and variant.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/budget', 'Runs and report go here.')
_STEPS = flags.DEFINE_list('steps', ['600', '2400'], 'Token budgets, in steps.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'],
                           'Seeds of every budget (a ranking needs three).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only redraw the report.')

ARMS = ('moe', 'dense_active')


def _ints(name, values) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) < (1 if name == 'steps' else 0):
    raise ConfigError(f'--{name}={",".join(values)} must be a comma-separated '
                     f'list of integers >= {1 if name == "steps" else 0}.')
  return out


def runs(config, steps: list[int], seeds: list[int]) -> dict:
  """{(steps, seed, arm): config} of the study."""
  out = {}
  for n in steps:
    for seed in seeds:
      c = config.copy_and_resolve_references()
      c.num_steps, c.seed = n, seed
      c.eval_every = max(n // 4, 1)
      # A checkpoint at every eval: a long budget stopped part way (a
      # session's end, a preemption) resumes exactly where it was.
      c.checkpoint_every = c.eval_every
      twins = run_config.dense_twins(c)
      for arm in ARMS:
        out[n, seed, arm] = twins[arm]
  return out


def run_dir(workdir: str, steps: int, seed: int, arm: str) -> str:
  return os.path.join(workdir, f'steps_{steps}', f'seed_{seed}', arm)


def _plot(path: str, points: list, gaps: list) -> None:
  """The gap against training tokens: each seed's, the mean and its 95%
  interval over seeds (for a budget with two seeds or more)."""
  fig, ax = plt.subplots(figsize=(7, 4))
  if points:
    xs, ys = zip(*points)
    ax.scatter(xs, ys, color='C0', alpha=0.5, label='one seed')
    gaps = sorted(gaps, key=lambda gap: gap[0])
    ax.plot([x for x, _ in gaps], [iv.mean for _, iv in gaps], color='C0', label='mean')
    with_seeds = [(x, iv) for x, iv in gaps if iv.kind == 'seeds']
    if with_seeds:
      ax.errorbar([x for x, _ in with_seeds], [iv.mean for _, iv in with_seeds],
                  yerr=[[iv.mean - iv.low for _, iv in with_seeds],
                        [iv.high - iv.mean for _, iv in with_seeds]],
                  fmt='none', ecolor='C0', capsize=4, label='95% interval over seeds')
    ax.legend()
  ax.axhline(0, color='k', lw=0.8)
  ax.set_xscale('log')
  ax.set_xlabel('training tokens')
  ax.set_ylabel('MoE - dense-active twin\nfinal validation loss (nats)')
  ax.set_title('Below 0: the MoE is ahead')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, steps: list[int], seeds: list[int]) -> str:
  lines = ['# MoE - dense-active twin, by token budget', '',
           'Final validation loss (nats/token, the final evaluation set) of each '
           'seed; the difference is MoE - twin, its interval 95% over seeds '
           '(Student t; with one seed none).', '',
           '| steps | tokens | seed | MoE | dense, matched active | MoE - twin |',
           '|---|---|---|---|---|---|']
  summary = ['', '| steps | tokens | seeds | mean MoE - twin | 95% interval | verdict |',
             '|---|---|---|---|---|---|']
  points, gaps = [], []  # (tokens, one seed's difference); (tokens, Interval)
  for n in steps:
    diffs = []
    for seed in seeds:
      finals = {}
      for arm in ARMS:
        path = os.path.join(run_dir(workdir, n, seed, arm), 'metrics.jsonl')
        if os.path.exists(path):
          finals[arm] = report.read_metrics(path)[3].get('loss')
      if None in finals.values() or len(finals) < 2:
        continue
      run = report.RunCurves('moe', os.path.dirname(run_dir(workdir, n, seed, 'moe')))
      tokens = n * run.tokens_per_step
      d = finals['moe'] - finals['dense_active']
      diffs.append(d)
      points.append((tokens, d))
      lines.append(f"| {n} | {tokens:,} | {seed} | {finals['moe']:.4f} | "
                   f"{finals['dense_active']:.4f} | {d:+.4f} |")
    if diffs:
      iv = intervals.mean_interval(diffs)
      gaps.append((tokens, iv))
      interval = f'[{iv.low:+.4f}, {iv.high:+.4f}]' if iv.kind == 'seeds' else '-'
      summary.append(f'| {n} | {tokens:,} | {len(diffs)} | {iv.mean:+.4f} | '
                     f'{interval} | {intervals.verdict(iv)} |')
  _plot(os.path.join(workdir, 'budget_gap.png'), points, gaps)
  path = os.path.join(workdir, 'budget.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines + summary + ['', '![gap](budget_gap.png)', '']))
  return path


def main(argv):
  del argv
  steps, seeds = _ints('steps', _STEPS.value), _ints('seeds', _SEEDS.value)
  if not _REPORT_ONLY.value:
    study = runs(_CONFIG.value, steps, seeds)
    sweep.train_unfinished(
        {run_dir(_WORKDIR.value, n, seed, arm): c for (n, seed, arm), c in study.items()},
        command=shlex.join(sys.argv))
  print('report:', write_report(_WORKDIR.value, steps, seeds))


if __name__ == '__main__':
  config_flag.run(main)
