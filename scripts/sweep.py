"""Sweeps: a grid or zip of config overrides -> named runs -> one table.

  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir runs/sweeps/experts
  python scripts/sweep.py --sweep configs/sweeps/experts.py --parallel 2
  python scripts/sweep.py --sweep configs/sweeps/experts.py --launcher print
  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir gs://B/sweeps/experts \\
      --launcher tpu --launcher_args='--tpu=my-v5p-32 --zone=us-east5-a --data_dir=gs://B/tfds'
  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir /shared/sweeps/experts \\
      --launcher slurm --launcher_args='--nodes=1 --gpus_per_node=8 --partition=gpu'
  python scripts/sweep.py --sweep configs/sweeps/experts.py --report_only

A sweep file (configs/sweeps/*.py) has `get_sweep(arg='')` returning a dict:
  config: the base config, 'configs/switch.py:cpu' (repo-relative or absolute)
  grid:   {'moe.num_experts': [4, 8, 16], ...}   every combination (the last
          key varies fastest)
  zip:    {'moe.router': [...], 'moe.top_k': [...]}   lists of one length,
          taken together; crossed with the grid when both are given
  fixed:  {'num_steps': 500, ...}   the same for every run (optional)
`--set KEY=VALUE` adds fixed overrides from the command line (they win).

Every run is named by its swept values, `num_experts=8,train_capacity_factor=1.25`
(the last part of each key; the whole key where two would clash), and lives in
WORKDIR/NAME. Before anything starts, every run's config is built and
validated (`moe.run_config.validate`) for the target's device count; one bad
run stops the whole sweep with its name and the reason.

Launchers: `local` (default) runs `train.py` then `eval.py` per run as
subprocesses, one after another or `--parallel N` at a time (logs in
WORKDIR/NAME/sweep_{train,eval}.log); `print` prints those commands; `tpu`
and `slurm` hand each run to scripts/launch_tpu.sh / scripts/launch_slurm.sh
(with `--launcher_args`; `--dry_run` prints what they would run).
A run whose newest checkpoint is at num_steps (and that has its eval.json,
with --eval) is skipped; an unfinished one resumes from its checkpoint.

At the end (and with --report_only) WORKDIR/results.csv and results.md hold
one row per run: its swept values, final train metrics, last in-training
eval and final evaluation (`final/loss`: the set of `final_eval_batches`,
by default the whole validation split) from metrics.jsonl, and eval.py's eval.json (loss, perplexity, bits per
byte, the capacity what-if); WORKDIR/<metric>_vs_<x>.png plots --metric
against the swept value --x (one line per combination of the other values).
A gs:// sweep is read through etils.epath (needs gcsfs) and its results are
written locally (--results_dir).
"""

from __future__ import annotations

import ast
import concurrent.futures
import csv
import dataclasses
import fnmatch
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from moe.run_dir import is_remote  # noqa: E402  (no jax: etils and moe.config only)

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file[:arg], e.g. configs/sweeps/experts.py.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Runs and results (default runs/sweeps/<sweep file name>[_<variant>]).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Local runs at a time (subprocesses).')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'print', 'tpu', 'slurm'],
                              'Where runs go.')
_LAUNCHER_ARGS = flags.DEFINE_string(
    'launcher_args', '', 'Arguments for scripts/launch_{tpu,slurm}.sh (one string).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False,
                             'tpu/slurm: print what would run; local: same as print.')
_EVAL = flags.DEFINE_bool('eval', True, 'Run eval.py after each training run.')
_SET = flags.DEFINE_multi_string('set', [], 'KEY=VALUE fixed override for every run.')
_ONLY = flags.DEFINE_multi_string('only', [], 'Only runs whose name matches (fnmatch).')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices each run gets, for validation (default: this '
    "machine's for local runs, the mesh's product otherwise).")
_METRIC = flags.DEFINE_string('metric', 'eval/loss', 'Column to plot.')
_X = flags.DEFINE_string('x', None, 'Swept key on the x axis (default: the first).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only rebuild the results.')
_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', None, 'Where results.csv/.md and the plot go (default: '
    '--workdir; runs/sweeps/<sweep file name>[_<variant>] when --workdir is gs://).')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Python for local runs.')


class SweepError(ValueError):
  """A sweep that cannot run; the message names the run and the reason."""


@dataclasses.dataclass
class Run:
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


def expand(sweep: dict, extra: dict | None = None) -> list[Run]:
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
  zip_points = ([dict(zip(zipped, combo)) for combo in zip(*zipped.values())]
                if zipped else [{}])
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
      runs.append(Run(name, values, {**fixed, **values}))
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


def build_config(base, run: Run):
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
  if isinstance(value, float):
    return repr(value)
  return str(value)


def config_args(config_spec: str, run: Run) -> list[str]:
  """train.py / eval.py arguments: --config and one --config.KEY=VALUE each."""
  path, sep, arg = config_spec.partition(':')
  return ['--config', repo_relative(path) + sep + arg] + [
      f'--config.{k}={flag_value(v)}' for k, v in run.overrides.items()]


def join(workdir: str, name: str) -> str:
  return workdir.rstrip('/') + '/' + name if is_remote(workdir) else os.path.join(workdir, name)


# --- Run state ----------------------------------------------------------------------------

def _read_json(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  p = epath.Path(path)
  return json.loads(p.read_text()) if p.exists() else None


def launched_steps(run_dir: str, default: int) -> int:
  """The num_steps a run was last launched with (its config.json), else
  `default`: what --report_only judges a run by, so that a run shrunk with
  --set num_steps=N is finished at N without repeating the --set."""
  return (_read_json(join(run_dir, 'config.json')) or {}).get('num_steps', default)


def status(run_dir: str, num_steps: int, with_eval: bool) -> tuple[str, int | None]:
  """('finished' | 'eval' | 'resume' | 'new', newest checkpoint step)."""
  from moe import checkpoint  # pylint: disable=g-import-not-at-top
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


# --- Launching ------------------------------------------------------------------------------

def local_commands(python: str, args: list[str], run_dir: str, todo: str,
                   with_eval: bool) -> list[list[str]]:
  cmds = []
  if todo in ('new', 'resume'):
    cmds.append([python, 'train.py', *args, '--workdir', run_dir])
  if with_eval and todo in ('new', 'resume', 'eval'):
    cmds.append([python, 'eval.py', *args, '--workdir', run_dir])
  return cmds


def launcher_command(launcher: str, launcher_args: str, args: list[str], run_dir: str,
                     job_name: str, with_eval: bool, dry_run: bool) -> list[str]:
  script = os.path.join(ROOT, 'scripts', f'launch_{launcher}.sh')
  cmd = ['bash', script, *shlex.split(launcher_args), f'--workdir={run_dir}']
  if launcher == 'slurm':
    cmd.append(f'--job_name={job_name}')
  if with_eval:
    cmd.append('--eval')
  if dry_run:
    cmd.append('--dry_run')
  return cmd + ['--', *args]


_print_lock = threading.Lock()


def _say(msg: str) -> None:
  with _print_lock:
    print(msg, flush=True)


def run_local(jobs: list[tuple[str, str, list[list[str]]]], parallel: int) -> dict:
  """Runs each job's commands in order (a failure stops that job), up to
  `parallel` jobs at a time. jobs: (name, run_dir, commands). -> name: rc."""
  results = {}

  def one(job):
    name, run_dir, cmds = job
    os.makedirs(run_dir, exist_ok=True)
    start = time.monotonic()
    for cmd in cmds:
      kind = 'train' if cmd[1] == 'train.py' else 'eval'
      log = os.path.join(run_dir, f'sweep_{kind}.log')
      _say(f'{name}: {kind} ({shlex.join(cmd[1:])})')
      with open(log, 'a') as f:
        f.write(f'$ {shlex.join(cmd)}\n')
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
      if rc:
        _say(f'{name}: {kind} FAILED (exit {rc}); see {log}')
        return name, rc
    _say(f'{name}: done in {time.monotonic() - start:.0f} s')
    return name, 0

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
    for name, rc in pool.map(one, jobs):
      results[name] = rc
  return results


def local_device_count(python: str) -> int:
  """Devices a local run sees, asked of a fresh process (this one never
  starts a backend: on a GPU it would take the memory the runs need)."""
  out = subprocess.run([python, '-c', 'import jax; print(jax.device_count())'],
                       capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


# --- Results ------------------------------------------------------------------------------------

TRAIN_COLUMNS = ('loss', 'total_loss', 'aux_loss', 'dropped_fraction',
                 'load_max_over_mean', 'router_entropy', 'dead_experts',
                 'ffn_experts_per_token', 'tokens_per_sec', 'mfu', 'train_seconds')
INFO_COLUMNS = ('num_params', 'num_active_params', 'flops_per_token')
EVAL_JSON_COLUMNS = ('loss', 'perplexity', 'bits_per_byte', 'dropped_fraction')
MD_COLUMNS = ('step', 'loss', 'eval/loss', 'final/loss', 'eval.json/loss', 'eval.json/perplexity',
              'dropped_fraction', 'eval.json/dropped_fraction', 'tokens_per_sec',
              'mfu', 'num_params', 'num_active_params')


def collect(run: Run, run_dir: str, state: str) -> dict:
  """One results row: swept values, final metrics, eval.json."""
  from moe import report  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
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


def _columns(rows: list[dict]) -> list[str]:
  cols = []
  for row in rows:
    cols += [k for k in row if k not in cols]
  return cols


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
  cols = _columns(rows)
  paths = {'csv': os.path.join(workdir, 'results.csv'),
           'md': os.path.join(workdir, 'results.md')}
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for row in rows:
      w.writerow({k: _cell(v) if isinstance(v, (tuple, list)) else v
                  for k, v in row.items()})
  plot = plot_metric(rows, workdir, swept, metric, x) if swept else None
  # The markdown table: the headline columns (results.csv has them all).
  md_cols = [c for c in ['run', 'status', *swept, *MD_COLUMNS, metric]
             if c in cols]
  md_cols = list(dict.fromkeys(md_cols))
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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  x = x or swept[0]
  if x not in swept:
    raise SweepError(f'--x={x!r} is not a swept key; choose one of {swept}.')
  have = [r for r in rows if isinstance(r.get(metric), (int, float))
          and math.isfinite(r[metric])]
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


# --- Main -------------------------------------------------------------------------------------------

def main(argv):
  del argv
  from moe.run_config import quiet_logs
  quiet_logs()
  if not _SWEEP.value:
    raise app.UsageError('--sweep is required, e.g. --sweep configs/sweeps/experts.py')
  try:
    return _main()
  except SweepError as e:
    print(f'sweep: {e}', file=sys.stderr)
    return 2


def _main() -> int:
  from moe import run_config  # pylint: disable=g-import-not-at-top
  from moe.config import ConfigError  # pylint: disable=g-import-not-at-top
  sweep_spec = _SWEEP.value
  path, _, arg = sweep_spec.partition(':')
  title = os.path.basename(path)[:-3]
  # The variant is part of the local directory: two variants never share one.
  local_dir = os.path.join('runs', 'sweeps', title + (f'_{arg}' if arg else ''))
  workdir = _WORKDIR.value or local_dir
  sweep = load_sweep(sweep_spec)
  base = load_config(sweep['config'])
  runs = expand(sweep, parse_set(base, _SET.value))
  if _ONLY.value:
    runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in _ONLY.value)]
    if not runs:
      raise SweepError(f'no run matches --only {_ONLY.value}.')
  swept = list(dict.fromkeys(k for r in runs for k in r.values))
  configs = {r.name: build_config(base, r) for r in runs}
  launcher = 'print' if (_LAUNCHER.value == 'local' and _DRY_RUN.value) else _LAUNCHER.value
  if launcher == 'local' and is_remote(workdir) and not _REPORT_ONLY.value:
    raise SweepError(f'--workdir {workdir}: the local launcher writes each run\'s log '
                     'beside it, so give a local path (or --launcher tpu for gs://).')
  # With --launcher print, stdout holds only the commands.
  info = functools.partial(print, file=sys.stderr if launcher == 'print' else sys.stdout,
                           flush=True)

  if not _REPORT_ONLY.value:
    # --- Validate every run before anything starts -------------------------------------
    num_devices = _NUM_DEVICES.value
    if num_devices is None and launcher in ('local', 'print'):
      num_devices = local_device_count(_PYTHON.value)
    for run in runs:
      config = configs[run.name]
      n = num_devices
      if n is None:
        n = math.prod(int(s) for s in config.mesh)
        if n < 0:
          raise SweepError(f'run {run.name}: mesh {tuple(config.mesh)} has a -1; '
                           'give --num_devices for the target.')
      try:
        run_config.validate(config, n)
      except ConfigError as e:
        raise SweepError(f'run {run.name} is not valid ({n} devices): {e}') from e
    info(f'sweep {title}: {len(runs)} runs validated '
          f'({num_devices or "mesh-sized"} devices each)')

    # --- What each run needs ---------------------------------------------------------------
    todo = {}
    for run in runs:
      run_dir = join(workdir, run.name)
      try:
        todo[run.name] = status(run_dir, configs[run.name].num_steps, _EVAL.value)
      except Exception as e:  # e.g. gs:// without gcsfs here: launch anyway
        info(f'{run.name}: cannot read {run_dir} ({type(e).__name__}: {e}); '
             'treating it as new')
        todo[run.name] = ('new', None)
    for run in runs:
      state, step = todo[run.name]
      what = {'finished': f'finished (step {step}), skipping',
              'eval': f'trained (step {step}), evaluating',
              'resume': f'resuming from step {step}', 'new': 'new'}[state]
      info(f'  {run.name}: {what}')
    pending = [r for r in runs if todo[r.name][0] != 'finished']
    if launcher == 'local' and pending:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
        json.dump({'sweep': sweep_spec, 'config': sweep['config'],
                   'runs': [dataclasses.asdict(r) for r in runs]}, f, indent=2,
                  default=str)

    # --- Launch ------------------------------------------------------------------------------------
    failed = []
    if launcher in ('local', 'print'):
      jobs = []
      for run in pending:
        run_dir = join(workdir, run.name)
        cmds = local_commands(_PYTHON.value, config_args(sweep['config'], run),
                              run_dir, todo[run.name][0], _EVAL.value)
        jobs.append((run.name, run_dir, cmds))
      if launcher == 'print':
        for _, _, cmds in jobs:
          print(' && '.join(shlex.join(c) for c in cmds))
        return 0
      rcs = run_local(jobs, _PARALLEL.value)
      failed = [n for n, rc in rcs.items() if rc]
    else:
      for run in pending:
        cmd = launcher_command(launcher, _LAUNCHER_ARGS.value,
                               config_args(sweep['config'], run),
                               join(workdir, run.name), f'{title}-{run.name}',
                               _EVAL.value, _DRY_RUN.value)
        print(f'{run.name}: {shlex.join(cmd)}', flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc:
          failed.append(run.name)
      if _DRY_RUN.value or launcher == 'slurm':
        if failed:
          print(f'launcher failed for {failed}', file=sys.stderr)
        return 1 if failed else 0   # nothing to aggregate yet (--report_only later)
    if failed:
      print(f'FAILED runs: {failed}', file=sys.stderr)

  # --- Aggregate ---------------------------------------------------------------------------------
  rows = []
  for run in runs:
    run_dir = join(workdir, run.name)
    try:
      num_steps = configs[run.name].num_steps
      if _REPORT_ONLY.value:
        num_steps = launched_steps(run_dir, num_steps)
      state, _ = status(run_dir, num_steps, _EVAL.value)
      rows.append(collect(run, run_dir, state))
    except Exception as e:  # unreadable (e.g. gs:// without gcsfs): say so
      print(f'{run.name}: cannot read {run_dir} ({type(e).__name__}: {e})',
            file=sys.stderr)
      rows.append({'run': run.name, 'status': 'unreadable', **run.values})
  results_dir = _RESULTS_DIR.value or (
      local_dir if is_remote(workdir) else workdir)
  paths = write_results(rows, results_dir, swept, _METRIC.value, _X.value, title)
  print('results:', ', '.join(paths.values()))
  unfinished = [r['run'] for r in rows if r['status'] != 'finished']
  if unfinished and not _REPORT_ONLY.value:
    print(f'unfinished runs: {unfinished}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
