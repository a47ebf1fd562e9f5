"""Sweeps: a sweep file -> named runs -> their state -> one table of results.

A sweep file (configs/sweeps/*.py) has `get_sweep(arg='')` returning a dict:
  config: the base config, 'configs/switch.py:cpu' (repo-relative or absolute)
  grid:   {'moe.num_experts': [4, 8, 16], ...}   every combination (the last
          key varies fastest)
  zip:    {'moe.router': [...], 'moe.top_k': [...]}   lists of one length,
          taken together; crossed with the grid when both are given
  fixed:  {'num_steps': 500, ...}   the same for every run (optional)
`--set KEY=VALUE` (parse_set) adds fixed overrides (they win).

Every run is named by its swept values, `num_experts=8,train_capacity_factor=1.25`
(the last part of each key; the whole key where two would clash), and lives in
WORKDIR/NAME. A results row (collect) holds its swept values, final train metrics,
last in-training eval and final evaluation (`final/loss`: the set of
`final_eval_batches`, by default the whole validation split) from metrics.jsonl, and
eval.py's eval.json (loss, perplexity, bits per byte, the capacity what-if). A gs://
sweep is read through etils.epath (needs gcsfs).
"""

import ast
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from moe import checkpoint, preflight, report, run_config, train_lib  # noqa: E402
from moe.process_sync import print0  # noqa: E402
from moe.run_dir import is_remote  # noqa: E402
from moe.user_error import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(UserError, ValueError):
  """A sweep that cannot run; the message names the run and the reason."""


@dataclasses.dataclass
class SweepRun:
  name: str
  values: dict        # swept key -> value
  overrides: dict     # every key -> value (fixed, then swept)


# --- Sweep files and expansion ---------------------------------------------------------

def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise SweepError(f'cannot load {path!r}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resolve_path(path: str) -> str:
  """A path as given if it exists from here, else relative to the repo."""
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(ROOT, path)


def repo_relative(path: str) -> str:
  """`path` relative to the repo root when inside it (for remote commands)."""
  full = resolve_path(path)
  rel = os.path.relpath(full, ROOT)
  return full if rel.startswith('..') else rel


def load_sweep(spec: str) -> dict:
  path, _, arg = spec.partition(':')
  module = _load_module(resolve_path(path), 'sweep_' + os.path.basename(path)[:-3])
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path} has no get_sweep()')
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  unknown = set(sweep) - {'config', 'grid', 'zip', 'fixed'}
  if unknown or 'config' not in sweep:
    raise SweepError(f'{path}: get_sweep() must return a dict with "config" and '
                     f'any of "grid", "zip", "fixed"; got keys {sorted(sweep)}.')
  return sweep


def _format_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return 'x'.join(_format_value(x) for x in v)
  text = repr(v) if isinstance(v, float) else str(v)
  return re.sub(r'[^A-Za-z0-9._+-]', '_', text)


def run_name(values: dict) -> str:
  """`num_experts=8,router=tokens_choose`: the last part of each key, the
  whole key where two would clash; 'base' for a sweep of one."""
  if not values:
    return 'base'
  short = {k: k.rsplit('.', 1)[-1] for k in values}
  clash = {s for s in short.values() if list(short.values()).count(s) > 1}
  return ','.join(f'{k if short[k] in clash else short[k]}={_format_value(v)}'
                  for k, v in values.items())


def expand(sweep: dict, extra: dict | None = None) -> list[SweepRun]:
  """The runs of a sweep, in order: the grid's product crossed with the zip."""
  grid = dict(sweep.get('grid') or {})
  zipped = dict(sweep.get('zip') or {})
  for name, table in (('grid', grid), ('zip', zipped)):
    for k, v in table.items():
      if not isinstance(v, (list, tuple)) or not v:
        raise SweepError(f'{name}[{k!r}] must be a non-empty list; got {v!r}.')
  both = set(grid) & set(zipped)
  if both:
    raise SweepError(f'{sorted(both)} are in both grid and zip.')
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise SweepError(f'zip lists must have one length; got '
                     f'{ {k: len(v) for k, v in zipped.items()} }.')
  grid_points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
  zip_points = ([dict(zip(zipped, combo)) for combo in zip(*zipped.values())] if zipped else [{}])
  fixed = {**(sweep.get('fixed') or {}), **(extra or {})}
  runs, seen = [], {}
  for g in grid_points:
    for z in zip_points:
      values = {**g, **z}
      name = run_name(values)
      if name in seen:
        raise SweepError(f'runs {seen[name]} and {values} would both be named '
                         f'{name!r}; make the swept values distinct.')
      seen[name] = values
      runs.append(SweepRun(name, values, {**fixed, **values}))
  return runs


def load_config(spec: str):
  """The base config of 'path.py[:variant]', locked like train.py's."""
  path, _, arg = spec.partition(':')
  module = _load_module(resolve_path(path), 'config_' + os.path.basename(path)[:-3])
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config


def _node_and_leaf(config, key: str):
  node, parts = config, key.split('.')
  for i, part in enumerate(parts[:-1]):
    if node is None or part not in node:
      raise SweepError(f'unknown config key {key!r} ({".".join(parts[:i + 1])} '
                       'does not exist).')
    node = node[part]
  if node is None or parts[-1] not in node:
    raise SweepError(f'unknown config key {key!r}.')
  return node, parts[-1]


def parse_set(config, items: list[str]) -> dict:
  """`--set KEY=VALUE` strings -> typed values (by the config field's type)."""
  out = {}
  for item in items:
    key, sep, text = item.partition('=')
    if not sep:
      raise SweepError(f'--set {item!r}: use KEY=VALUE.')
    node, leaf = _node_and_leaf(config, key)
    current = node[leaf]
    if isinstance(current, str):
      out[key] = text
    elif isinstance(current, bool):
      if text not in ('True', 'False', 'true', 'false', '1', '0'):
        raise SweepError(f'--set {key}={text!r}: give True or False.')
      out[key] = text in ('True', 'true', '1')
    else:
      try:
        out[key] = ast.literal_eval(text)
      except (ValueError, SyntaxError) as e:
        raise SweepError(f'--set {key}={text!r}: not a Python literal.') from e
  return out


def build_config(base, run: SweepRun):
  """A copy of the locked base config with the run's overrides applied."""
  config = base.copy_and_resolve_references()
  config.lock()
  for key, value in run.overrides.items():
    node, leaf = _node_and_leaf(config, key)
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f'run {run.name}: {key}={value!r}: {e}') from e
  return config


def flag_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, float) else str(value)


def config_args(config_spec: str, run: SweepRun) -> list[str]:
  """train.py / eval.py arguments: --config and one --config.KEY=VALUE each."""
  path, sep, arg = config_spec.partition(':')
  return ['--config', repo_relative(path) + sep + arg] + [
      f'--config.{k}={flag_value(v)}' for k, v in run.overrides.items()]


def join(workdir: str, name: str) -> str:
  return workdir.rstrip('/') + '/' + name if is_remote(workdir) else os.path.join(workdir, name)


# --- Run state ----------------------------------------------------------------------------

def _read_json(path: str):
  p = epath.Path(path)
  return json.loads(p.read_text()) if p.exists() else None


def launched_steps(run_dir: str, default: int) -> int:
  """The num_steps a run was last launched with (its config.json), else
  `default`: what --report_only judges a run by, so that a run shrunk with
  --set num_steps=N is finished at N without repeating the --set."""
  return (_read_json(join(run_dir, 'config.json')) or {}).get('num_steps', default)


def status(run_dir: str, num_steps: int, with_eval: bool) -> tuple[str, int | None]:
  """('finished' | 'eval' | 'resume' | 'new', newest checkpoint step)."""
  latest = checkpoint.latest_step(run_dir)
  if latest is None:
    return 'new', None
  if latest < num_steps:
    return 'resume', latest
  if with_eval:
    result = _read_json(join(run_dir, 'eval.json'))
    if not result or result.get('step') != latest:
      return 'eval', latest
  return 'finished', latest


def train_unfinished(runs: dict, *, command: str) -> None:
  """Trains here, one after another, each unfinished `workdir -> config` of
  `runs` (status without eval), after every run's pre-flight (a bad one
  fails before any trains)."""
  built = {workdir: run_config.build(config) for workdir, config in runs.items()}
  for workdir, run in built.items():
    preflight.check(run, workdir, writes=True)
  for workdir, run in built.items():
    state, done = status(workdir, run.loop.num_steps, with_eval=False)
    print0(f'{workdir}: finished ({done} steps), skipping' if state == 'finished'
           else f'{workdir}: training to step {run.loop.num_steps}')
    if state != 'finished':
      train_lib.train(run, workdir, command=command)


# --- Results ------------------------------------------------------------------------------------

TRAIN_COLUMNS = ('loss', 'total_loss', 'aux_loss', 'dropped_fraction',
                 'load_max_over_mean', 'router_entropy', 'dead_experts',
                 'ffn_experts_per_token', 'tokens_per_sec', 'mfu', 'train_seconds')
INFO_COLUMNS = ('num_params', 'num_active_params', 'flops_per_token')
EVAL_JSON_COLUMNS = ('loss', 'perplexity', 'bits_per_byte', 'dropped_fraction')
MD_COLUMNS = ('step', 'loss', 'eval/loss', 'final/loss', 'eval.json/loss', 'eval.json/perplexity',
              'dropped_fraction', 'eval.json/dropped_fraction', 'tokens_per_sec',
              'mfu', 'num_params', 'num_active_params')


def collect(run: SweepRun, run_dir: str, state: str) -> dict:
  """One results row: swept values, final metrics, eval.json."""
  row = {'run': run.name, 'status': state, **run.values}
  metrics = epath.Path(join(run_dir, 'metrics.jsonl'))
  if metrics.exists():
    info, train, evals, final = report.read_metrics(str(metrics))
    if train:
      step = max(train)
      row['step'] = step
      row.update({k: train[step][k] for k in TRAIN_COLUMNS if k in train[step]})
    if evals:
      last = evals[max(evals)]
      row['eval_step'] = max(evals)
      row.update({f'eval/{k}': v for k, v in last.items()
                  if k in ('loss', 'dropped_fraction', 'aux_loss')})
    row.update({f'final/{k}': v for k, v in final.items()
                if k in ('loss', 'dropped_fraction', 'tokens', 'documents')})
    row.update({k: info[k] for k in INFO_COLUMNS if k in info})
  result = _read_json(join(run_dir, 'eval.json'))
  if result:
    row.update({f'eval.json/{k}': result[k] for k in EVAL_JSON_COLUMNS if k in result})
    for r in result.get('capacity_what_if', []):
      row[f'eval.json/cf={r["capacity_factor"]}/loss'] = r['loss']
      row[f'eval.json/cf={r["capacity_factor"]}/dropped_fraction'] = r['dropped_fraction']
  return row


def _cell(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4g}' if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f'{v:.4f}'
  if isinstance(v, (tuple, list)):
    return str(tuple(v))
  return str(v)


def write_results(rows: list[dict], workdir: str, swept: list[str], metric: str,
                  x: str | None, title: str) -> dict:
  """results.csv, results.md and the plot; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  cols = list(dict.fromkeys(k for row in rows for k in row))
  paths = {'csv': os.path.join(workdir, 'results.csv'), 'md': os.path.join(workdir, 'results.md')}
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for row in rows:
      w.writerow({k: _cell(v) if isinstance(v, (tuple, list)) else v for k, v in row.items()})
  plot = plot_metric(rows, workdir, swept, metric, x) if swept else None
  # The markdown table: the headline columns (results.csv has them all).
  md_cols = list(dict.fromkeys(c for c in ['run', 'status', *swept, *MD_COLUMNS, metric]
                               if c in cols))
  lines = [f'# Sweep {title}', '', f'{len(rows)} runs; swept: {", ".join(swept) or "nothing"}. '
           'Every column is in results.csv.',
           '', '| ' + ' | '.join(md_cols) + ' |', '|' + '---|' * len(md_cols)]
  lines += ['| ' + ' | '.join(_cell(row.get(k)) for k in md_cols) + ' |' for row in rows]
  if plot:
    lines += ['', f'![{metric}]({os.path.basename(plot)})']
    paths['plot'] = plot
  with open(paths['md'], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return paths


def plot_metric(rows, workdir, swept, metric, x) -> str | None:
  """`metric` against swept key `x`, one line per setting of the other keys."""
  x = x or swept[0]
  if x not in swept:
    raise SweepError(f'--x={x!r} is not a swept key; choose one of {swept}.')
  have = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
  if not have:
    print(f'plot: no run has {metric!r} yet; no plot.')
    return None
  numeric = all(isinstance(r[x], (int, float)) and not isinstance(r[x], bool) for r in have)
  labels = sorted({_cell(r[x]) for r in have}) if not numeric else None
  others = [k for k in swept if k != x]
  series: dict[str, list] = {}
  for r in have:
    key = ', '.join(f'{k.rsplit(".", 1)[-1]}={_cell(r[k])}' for k in others) or metric
    series.setdefault(key, []).append(r)
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, rs in series.items():
    pos = [r[x] if numeric else labels.index(_cell(r[x])) for r in rs]
    pts = sorted(zip(pos, (r[metric] for r in rs)))
    ax.plot([p for p, _ in pts], [v for _, v in pts], 'o-', label=key)
  if not numeric:
    ax.set_xticks(range(len(labels)), labels)
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  if len(series) > 1 or others:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, f'{re.sub(r"[^A-Za-z0-9._-]", "_", metric)}_vs_'
                      f'{x.rsplit(".", 1)[-1]}.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
