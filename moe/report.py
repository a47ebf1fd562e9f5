"""The MoE-vs-dense-twins report: `report.md` and PNG plots, built only from
the runs' `metrics.jsonl` files (so it can be regenerated without training).

Runs are named `moe`, `dense_total` (matched total parameters) and
`dense_active` (matched active FLOPs per token), each in `workdir/NAME`.
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402  (local or gs:// workdirs)

RUNS = ('moe', 'dense_total', 'dense_active')
LABELS = {'moe': 'MoE', 'dense_total': 'dense, matched total params',
          'dense_active': 'dense, matched active FLOPs'}
PLOTS = ('loss_curves.png', 'throughput.png', 'expert_load.png', 'router.png')


def read_metrics(path: str) -> tuple[dict, dict, dict]:
  """(info, train rows by step, eval rows by step) from one metrics.jsonl;
  a step logged twice (after a resume) keeps its last line."""
  info, train, evals = {}, {}, {}
  for line in epath.Path(path).read_text().splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
    step = row.pop('step')
    if 'flops_per_token' in row:
      info.update(row)
    elif any(k.startswith('eval/') for k in row):
      evals[step] = {k[len('eval/'):]: v for k, v in row.items()}
    else:
      train[step] = row
  return info, train, evals


class Run:
  """One run's curves."""

  def __init__(self, name: str, workdir: str):
    self.name = name
    self.info, self.train, self.evals = read_metrics(
        os.path.join(workdir, name, 'metrics.jsonl'))
    config = json.loads((epath.Path(workdir) / name / 'config.json').read_text())
    self.tokens_per_step = config['batch_size'] * config['seq_len']
    self.eval_steps = np.array(sorted(self.evals))
    self.eval_loss = np.array([self.evals[s]['loss'] for s in self.eval_steps])

  def seconds_at(self, step: int) -> float:
    """Training wall-clock seconds at `step` (interpolated between logs)."""
    steps = sorted(s for s in self.train if 'train_seconds' in self.train[s])
    secs = [self.train[s]['train_seconds'] for s in steps]
    return float(np.interp(step, [0] + steps, [0.0] + secs))

  def median(self, key: str) -> float:
    vals = [r[key] for s, r in sorted(self.train.items()) if s > 1 and key in r]
    return float(np.median(vals)) if vals else math.nan

  @property
  def final_loss(self) -> float:
    return float(self.eval_loss[-1]) if len(self.eval_loss) else math.nan

  def first_step_reaching(self, loss: float) -> int | None:
    hit = np.nonzero(self.eval_loss <= loss)[0]
    return int(self.eval_steps[hit[0]]) if len(hit) else None


def _save(fig, path):
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=110)
  plt.close(fig)


def _loss_curves(runs, path):
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  xs = {
      'steps': lambda r: r.eval_steps,
      'tokens': lambda r: r.eval_steps * r.tokens_per_step,
      'wall-clock seconds (training)': lambda r: np.array(
          [r.seconds_at(s) for s in r.eval_steps]),
      'training FLOPs (active experts)': lambda r: (
          r.eval_steps * r.tokens_per_step * r.info['flops_per_token']),
  }
  for ax, (xlabel, x) in zip(axes, xs.items()):
    for r in runs:
      ax.plot(x(r), r.eval_loss, marker='o', ms=3, label=LABELS[r.name])
    ax.set_xlabel(xlabel)
    ax.set_ylabel('validation loss (nats/token)')
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle('Validation loss: MoE vs. its dense twins (same data order and seed)')
  _save(fig, path)


def _throughput(runs, path):
  keys = [('tokens_per_sec', 'tokens/s'), ('tflops_per_sec', 'model TFLOP/s'),
          ('mfu', 'MFU')]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (key, title) in zip(axes, keys):
    vals = [r.median(key) for r in runs]
    ax.bar([LABELS[r.name] for r in runs], vals, color=['C0', 'C1', 'C2'])
    ax.set_title(title + ' (median over logs)')
    ax.tick_params(axis='x', labelrotation=12)
  _save(fig, path)


def _expert_load(moe, path):
  steps = [s for s in sorted(moe.train) if 'expert_load' in moe.train[s]]
  load = np.array([moe.train[s]['expert_load'] for s in steps])   # [T, L, E]
  _, num_layers, num_experts = load.shape
  fig, ax = plt.subplots(figsize=(12, 0.35 * num_layers * num_experts + 1.5))
  image = ax.imshow(load.reshape(len(steps), -1).T, aspect='auto',
                    interpolation='nearest', cmap='viridis',
                    extent=(steps[0], steps[-1], num_layers * num_experts - 0.5, -0.5))
  ax.set_yticks(range(num_layers * num_experts))
  ax.set_yticklabels([f'layer {l} expert {e}' for l in range(num_layers)
                      for e in range(num_experts)], fontsize=7)
  ax.set_xlabel('step')
  ax.set_title(f'Expert load (fraction of routed tokens); uniform = {1 / num_experts:.3f}')
  fig.colorbar(image, ax=ax)
  _save(fig, path)


def _router(moe, path):
  keys = [('dropped_fraction', 'dropped fraction'), ('aux_loss', 'aux loss (1 = uniform)'),
          ('router_entropy', 'router entropy (nats)')]
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  steps = sorted(moe.train)
  for ax, (key, title) in zip(axes, keys):
    pts = [(s, moe.train[s][key]) for s in steps if key in moe.train[s]]
    ax.plot(*zip(*pts), marker='.', label='train')
    evs = [(s, moe.evals[s][key]) for s in sorted(moe.evals) if key in moe.evals[s]]
    if evs:
      ax.plot(*zip(*evs), marker='o', label='validation')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend()
  _save(fig, path)


def _speedup(moe: Run, dense: Run) -> tuple[str, str]:
  """MoE speed-up in steps and wall-clock to reach the twin's final loss."""
  step = moe.first_step_reaching(dense.final_loss)
  if step is None:
    return 'not reached', 'not reached'
  dense_end = int(dense.eval_steps[-1])
  return (f'{dense_end / step:.2f}x',
          f'{dense.seconds_at(dense_end) / max(moe.seconds_at(step), 1e-9):.2f}x')


def table(runs) -> list[str]:
  moe = runs[0]
  rows = ['| run | total params | active params | FLOPs/token | tokens/s | '
          'peak memory (MiB) | final val loss | MoE speed-up to this loss '
          '(steps / wall-clock) |', '|' + '---|' * 8]
  for r in runs:
    speed = '' if r is moe else ' / '.join(_speedup(moe, r))
    rows.append(
        f"| {LABELS[r.name]} | {r.info['num_params']:,} | "
        f"{r.info['num_active_params']:,} | {r.info['flops_per_token'] / 1e6:.2f}M | "
        f"{r.median('tokens_per_sec'):,.0f} | {r.info['peak_memory_mb']:.0f} | "
        f'{r.final_loss:.4f} | {speed} |')
  return rows


def write_report(workdir: str) -> str:
  """Writes workdir/report.md and the PNG plots; returns the report's path."""
  runs = [Run(name, workdir) for name in RUNS]
  moe = runs[0]
  _loss_curves(runs, os.path.join(workdir, PLOTS[0]))
  _throughput(runs, os.path.join(workdir, PLOTS[1]))
  _expert_load(moe, os.path.join(workdir, PLOTS[2]))
  _router(moe, os.path.join(workdir, PLOTS[3]))
  last = moe.train[max(moe.train)]
  tokens_per_step = moe.tokens_per_step
  lines = [
      '# MoE vs. dense twins', '',
      f'Three runs on the same data order and seed, {int(moe.eval_steps[-1])} '
      f'steps of {tokens_per_step:,} tokens each. Validation loss is in '
      'nats/token. MFU is measured against a '
      f"{moe.info['mfu_peak_source']} peak of "
      f"{moe.info['peak_tflops_per_device']:.3g} TFLOP/s per device.", '',
      *table(runs), '',
      f"Throughput ratio MoE / matched-total dense: "
      f"{moe.median('tokens_per_sec') / runs[1].median('tokens_per_sec'):.2f}x "
      f"(analytic FLOP ratio {runs[1].info['flops_per_token'] / moe.info['flops_per_token']:.2f}x).",
      f"MoE at the last log: dropped fraction {last.get('dropped_fraction', math.nan):.4f}, "
      f"load max/mean {last.get('load_max_over_mean', math.nan):.2f}, "
      f"dead experts {last.get('dead_experts', 0)}.", '',
      '## Validation loss', '', f'![loss curves]({PLOTS[0]})', '',
      '## Throughput', '', f'![throughput]({PLOTS[1]})', '',
      '## Expert load over training', '', f'![expert load]({PLOTS[2]})', '',
      '## Router', '', f'![router]({PLOTS[3]})', '']
  path = os.path.join(workdir, 'report.md')
  epath.Path(path).write_text('\n'.join(lines))
  return path
