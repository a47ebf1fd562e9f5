"""The MoE-vs-dense-twins report: `report.md` and PNG plots, built only from
the runs' files (so it can be regenerated without training).

Runs are named `moe`, `dense_total` (matched total parameters) and
`dense_active` (matched active FLOPs per token), one of each per seed in
`workdir/seed_{i}/NAME`. The report compares final validation losses (the
`final/` evaluation, by default the whole validation split) with 95%
intervals (moe.intervals): over seeds when there are several (arms share
seed i, so the per-seed MoE - twin differences are paired), else by a
bootstrap over validation documents (`final_eval_documents.json`), which
measures evaluation noise only. It ends with one sentence per twin.
"""

from __future__ import annotations

import json
import math
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402  (local or gs:// workdirs)

from moe import intervals, run_dir  # noqa: E402

RUNS = ('moe', 'dense_total', 'dense_active')
LABELS = {'moe': 'MoE', 'dense_total': 'dense, matched total params',
          'dense_active': 'dense, matched active FLOPs'}
PLOTS = ('loss_curves.png', 'throughput.png', 'expert_load.png', 'router.png')


def read_metrics(path: str) -> tuple[dict, dict, dict, dict]:
  """(info, train rows by step, eval rows by step, the final evaluation) from
  one metrics.jsonl; a step logged twice (after a resume) keeps its last
  line. The final evaluation (`final/` keys, on the set of
  `final_eval_batches`) is {} until the run has finished."""
  info, train, evals, final = {}, {}, {}, {}
  for line in epath.Path(path).read_text().splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
    step = row.pop('step')
    if 'mfu_peak_source' in row:   # logged once at start (train rows of an
      info.update(row)             # adaptive model carry flops_per_token too)
    elif any(k.startswith('eval/') for k in row):
      evals[step] = {k[len('eval/'):]: v for k, v in row.items()}
    elif any(k.startswith('final/') for k in row):
      final = {k[len('final/'):]: v for k, v in row.items()}
      final['step'] = step
    else:
      train[step] = row
  return info, train, evals, final


class RunCurves:
  """One run's curves."""

  def __init__(self, name: str, workdir: str):
    self.name = name
    self.dir = os.path.join(workdir, name)
    self.info, self.train, self.evals, self.final = read_metrics(
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
    """The final evaluation's loss (on its own set, by default the whole
    validation split), else the last periodic evaluation's."""
    if 'loss' in self.final:
      return float(self.final['loss'])
    return float(self.eval_loss[-1]) if len(self.eval_loss) else math.nan

  def document_losses(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(loss sum, tokens) per document of the final evaluation, if saved."""
    path = epath.Path(self.dir) / 'final_eval_documents.json'
    if not path.exists():
      return None
    d = json.loads(path.read_text())
    return np.asarray(d['loss_sum']), np.asarray(d['tokens'])

  def first_step_reaching(self, loss: float) -> int | None:
    hit = np.nonzero(self.eval_loss <= loss)[0]
    return int(self.eval_steps[hit[0]]) if len(hit) else None


def _save(fig, path):
  fig.tight_layout()
  run_dir.write_figure(path, fig)
  plt.close(fig)


def _loss_curves(by_seed, path):
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
    for i, runs in enumerate(by_seed.values()):
      for color, r in zip(('C0', 'C1', 'C2'), runs):
        ax.plot(x(r), r.eval_loss, marker='o', ms=3, color=color,
                alpha=1.0 if i == 0 else 0.35,
                label=LABELS[r.name] if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('validation loss (nats/token)')
    ax.grid(alpha=0.3)
  axes[0].legend()
  seeds = ', '.join(map(str, by_seed))
  fig.suptitle('Periodic validation loss: MoE vs. its dense twins (same data '
               f'order; seed{"s" if len(by_seed) > 1 else ""} {seeds})')
  _save(fig, path)


def _throughput(runs, path):
  keys = [('tokens_per_sec', 'tokens/s'), ('tflops_per_sec', 'model TFLOP/s'), ('mfu', 'MFU')]
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


def _speedup(moe: RunCurves, dense: RunCurves) -> tuple[str, str]:
  """MoE speed-up in steps and wall-clock to reach the twin's last periodic
  evaluation loss (the curves' own set)."""
  step = moe.first_step_reaching(float(dense.eval_loss[-1]))
  if step is None:
    return 'not reached', 'not reached'
  dense_end = int(dense.eval_steps[-1])
  return (f'{dense_end / step:.2f}x',
          f'{dense.seconds_at(dense_end) / max(moe.seconds_at(step), 1e-9):.2f}x')


def table(runs) -> list[str]:
  moe = runs[0]
  rows = ['| run | total params | active params | FLOPs/token | tokens/s | '
          'peak memory (MiB) | final val loss | MoE speed-up to this run\'s '
          'last periodic eval loss (steps / wall-clock) |', '|' + '---|' * 8]
  for r in runs:
    speed = '' if r is moe else ' / '.join(_speedup(moe, r))
    rows.append(
        f"| {LABELS[r.name]} | {r.info['num_params']:,} | "
        f"{r.info['num_active_params']:,} | {r.info['flops_per_token'] / 1e6:.2f}M | "
        f"{r.median('tokens_per_sec'):,.0f} | {r.info['peak_memory_mb']:.0f} | "
        f'{r.final_loss:.4f} | {speed} |')
  return rows


def seeds(workdir: str) -> list[int]:
  """The seeds with a `seed_{i}` folder in `workdir`, ascending."""
  found = [int(m.group(1)) for p in epath.Path(workdir).glob('seed_*')
           if (m := re.fullmatch(r'seed_(\d+)', p.name))]
  return sorted(found)


def _difference(moe_runs, twin_runs) -> intervals.Interval:
  """MoE - twin final validation loss: over seeds, or with one seed a
  bootstrap over validation documents (when both runs saved them)."""
  if len(moe_runs) > 1:
    return intervals.mean_interval(
        [m.final_loss - t.final_loss for m, t in zip(moe_runs, twin_runs)])
  docs = moe_runs[0].document_losses(), twin_runs[0].document_losses()
  if None in docs:
    return intervals.mean_interval([moe_runs[0].final_loss - twin_runs[0].final_loss])
  (loss_m, tokens), (loss_t, _) = docs
  return intervals.paired_bootstrap(loss_m, loss_t, tokens)


def sentence(twin: str, d: intervals.Interval) -> str:
  """One plain sentence: where the MoE stands against `twin`."""
  what = intervals.verdict(d)
  label = LABELS[twin]
  noise = ('over seeds' if d.kind == 'seeds' else 'evaluation noise only: one training run')
  if what == 'not ranked':
    return (f'Against the {label} twin: not ranked (a single run without '
            f'per-document losses; difference {d.mean:+.4f} nats).')
  size = f'{abs(d.mean):.4f} nats (95% interval of MoE - twin [{d.low:+.4f}, {d.high:+.4f}], {noise})'
  if what == 'ahead':
    return f'Against the {label} twin: the MoE is **ahead** by {size}.'
  if what == 'behind':
    return f'Against the {label} twin: the MoE is **behind** by {size}.'
  return (f'Against the {label} twin: **within noise** (MoE - twin '
          f'{d.mean:+.4f} nats, 95% interval [{d.low:+.4f}, {d.high:+.4f}], {noise}).')


def comparison(by_seed: dict) -> tuple[list[str], list[str]]:
  """(the markdown lines of the intervals section, the verdict sentences)."""
  arms = {name: [runs[i] for runs in by_seed.values()] for i, name in enumerate(RUNS)}
  lines = ['| run | seeds | final val loss per seed | mean | 95% interval |',
           '|---|---|---|---|---|']
  for name, runs in arms.items():
    m = intervals.mean_interval([r.final_loss for r in runs])
    interval = (f'[{m.low:.4f}, {m.high:.4f}]' if m.kind == 'seeds' else 'one seed')
    lines.append(f'| {LABELS[name]} | {len(runs)} | '
                 + ', '.join(f'{r.final_loss:.4f}' for r in runs)
                 + f' | {m.mean:.4f} | {interval} |')
  lines += ['', '| MoE - twin | per seed | mean | 95% interval | interval over | verdict |',
            '|---|---|---|---|---|---|']
  sentences = []
  for twin in ('dense_active', 'dense_total'):
    d = _difference(arms['moe'], arms[twin])
    per_seed = ', '.join(f'{m.final_loss - t.final_loss:+.4f}'
                         for m, t in zip(arms['moe'], arms[twin]))
    over = {'seeds': f'{d.n} seeds', 'single value': '-'}.get(
        d.kind, f'{d.n} documents (bootstrap)')
    interval = '-' if d.kind == 'single value' else f'[{d.low:+.4f}, {d.high:+.4f}]'
    lines.append(f'| vs. {LABELS[twin]} | {per_seed} | {d.mean:+.4f} | {interval} | '
                 f'{over} | {intervals.verdict(d)} |')
    sentences.append(sentence(twin, d))
  return lines, sentences


def _routes_section(workdir: str, seed: int) -> list[str]:
  """What the MoE's experts took (scripts/routes.py's analysis of its final
  checkpoint, written by compare.py), if it is there."""
  rel = f'seed_{seed}/moe/routes'
  found = epath.Path(workdir) / rel / 'routes.json'
  if not found.exists():
    return []
  r = json.loads(found.read_text())
  by_category = ', '.join(f"{100 * l['category_explains']:.0f}%" for l in r['layers'])
  by_token = ', '.join(f"{100 * l['token_explains']:.0f}%" for l in r['layers'])
  return [
      '## What the experts learned', '',
      f"The MoE's routing at step {r['step']} over {r['tokens']:,} validation "
      f"tokens ([routes.md]({rel}/routes.md)). Share of the top-1 expert's "
      f'entropy explained by the token\'s {r["categories_labeller"]} category, '
      f'per MoE layer: {by_category}; by the token itself: {by_token} (100%: it '
      'decides the expert, 0%: independent).', '',
      f'![category x expert]({rel}/heatmap.png)', '',
      f'![validation text coloured by expert]({rel}/code.png)', '']


def write_report(workdir: str) -> str:
  """Writes workdir/report.md and the PNG plots; returns the report's path."""
  found = seeds(workdir)
  if not found:
    raise FileNotFoundError(
        f'no runs in {workdir}: expected seed_0/moe, seed_0/dense_total, ... '
        '(scripts/compare.py trains them).')
  by_seed = {s: [RunCurves(name, os.path.join(workdir, f'seed_{s}')) for name in RUNS]
             for s in found}
  runs = by_seed[found[0]]
  moe = runs[0]
  _loss_curves(by_seed, os.path.join(workdir, PLOTS[0]))
  _throughput(runs, os.path.join(workdir, PLOTS[1]))
  _expert_load(moe, os.path.join(workdir, PLOTS[2]))
  _router(moe, os.path.join(workdir, PLOTS[3]))
  last = moe.train[max(moe.train)]
  tokens_per_step = moe.tokens_per_step
  spread, sentences = comparison(by_seed)
  final = moe.final
  evaluated = (f"{final['tokens']:,.0f} target tokens of {final['documents']:,.0f} "
               'validation documents' if 'tokens' in final else
               'the last periodic evaluation (no final evaluation logged)')
  lines = [
      '# MoE vs. dense twins', '',
      f'{len(found)} seed{"s" if len(found) > 1 else ""} ({", ".join(map(str, found))}) '
      f'of three runs each on the same data order, {int(moe.eval_steps[-1])} '
      f'steps of {tokens_per_step:,} tokens each. Final validation losses '
      f'(nats/token) are on {evaluated}. MFU is measured against a '
      f"{moe.info['mfu_peak_source']} peak of "
      f"{moe.info['peak_tflops_per_device']:.3g} TFLOP/s per device.", '',
      *sentences, '',
      f'## Seed {found[0]}', '',
      *table(runs), '',
      f"Throughput ratio MoE / matched-total dense: "
      f"{moe.median('tokens_per_sec') / runs[1].median('tokens_per_sec'):.2f}x "
      f"(analytic FLOP ratio {runs[1].info['flops_per_token'] / moe.info['flops_per_token']:.2f}x).",
      f"MoE at the last log: dropped fraction {last.get('dropped_fraction', math.nan):.4f}, "
      f"load max/mean {last.get('load_max_over_mean', math.nan):.2f}, "
      f"dead experts {last.get('dead_experts', 0)}; at the final evaluation "
      f"(eval capacity) it dropped {final.get('dropped_fraction', math.nan):.4f}.", '',
      '## Final validation loss with 95% intervals', '', *spread, '',
      '## Validation loss', '', f'![loss curves]({PLOTS[0]})', '',
      '## Throughput', '', f'![throughput]({PLOTS[1]})', '',
      '## Expert load over training', '', f'![expert load]({PLOTS[2]})', '',
      '## Router', '', f'![router]({PLOTS[3]})', '',
      *_routes_section(workdir, found[0])]
  path = os.path.join(workdir, 'report.md')
  epath.Path(path).write_text('\n'.join(lines))
  return path
